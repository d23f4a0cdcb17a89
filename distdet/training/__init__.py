"""Building blocks of the trainer (:mod:`distdet.trainer`): config, optimizer and schedule,
sharded sampling, checkpoints, launch checks, signals and run logging."""
