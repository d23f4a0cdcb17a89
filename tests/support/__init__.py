"""Test support: real-data location (:mod:`.data`), tiny datasets and child processes for the
trainer tests (:mod:`.trainer`), a trained model for predict/export/report (:mod:`.predict`),
records and detections for the metric tests (:mod:`.evalm`), a real local Slurm cluster
(:mod:`.slurm_cluster`), and the scripts the tests start as processes (``evaluate_child.py``,
``launch_probe.py``)."""
