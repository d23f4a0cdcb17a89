"""Run ``distdet evaluate`` in one process of an ``accelerate launch`` (tests only).

Builds a parser holding only the evaluate command (so it runs before every other command
module exists), runs it, and checks that the process group has the size the test expects
(environment ``EXPECTED_WORLD_SIZE``).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch.distributed as dist

from distdet.commands import evaluate


def main() -> int:
    parser = argparse.ArgumentParser(prog="distdet")
    evaluate.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(sys.argv[1:])
    status = int(args.func(args) or 0)
    world = dist.get_world_size() if dist.is_initialized() else 1
    expected = int(os.environ["EXPECTED_WORLD_SIZE"])
    if world != expected:
        print(f"world size {world}, expected {expected}", file=sys.stderr)
        return 3
    print(f"child rank {dist.get_rank() if dist.is_initialized() else 0} of {world} backend "
          f"{dist.get_backend() if dist.is_initialized() else 'none'} status {status}")
    return status


if __name__ == "__main__":
    sys.exit(main())
