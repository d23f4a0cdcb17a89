"""Training: the loop (:mod:`.trainer`, read top to bottom) and its parts - the config and its
flags, data setup, sharded sampling, optimizer and schedule, checkpoints, run logging, and the
plots read back from the run folder (:mod:`.report`)."""
