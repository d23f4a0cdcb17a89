"""Train a detector: ``python train.py --help``, or ``accelerate launch ... train.py ...``.

The same as ``python -m distdet train``; the loop lives in :mod:`distdet.training.trainer`.
"""
import sys

from distdet.training.trainer import main

if __name__ == "__main__":
    sys.exit(main())
