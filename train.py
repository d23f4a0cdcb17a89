"""Train a detector: ``python train.py --help``, or ``accelerate launch ... train.py ...``.

The same code path as ``python -m distdet train`` (:mod:`distdet.commands.train`); the loop
lives in :mod:`distdet.training.trainer`.
"""
import sys

from distdet.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
