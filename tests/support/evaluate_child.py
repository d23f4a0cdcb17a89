"""Run ``distdet evaluate`` in one process of an ``accelerate launch`` (tests only).

Builds a parser holding only the evaluate command (so it runs before every other command
module exists), runs it, and checks that the process group has the size the test expects
(environment ``EXPECTED_WORLD_SIZE``). Each process writes what it saw to
``$CHILD_REPORT_DIR/rank<r>.json`` (stdout of several processes can interleave).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from distdet.commands import evaluate


def main() -> int:
    parser = argparse.ArgumentParser(prog="distdet")
    evaluate.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(sys.argv[1:])
    status = int(args.func(args) or 0)
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    backend = dist.get_backend() if dist.is_initialized() else "none"
    report = {"rank": rank, "world_size": world, "backend": backend, "status": status}
    (Path(os.environ["CHILD_REPORT_DIR"]) / f"rank{rank}.json").write_text(json.dumps(report))
    expected = int(os.environ["EXPECTED_WORLD_SIZE"])
    if world != expected:
        print(f"world size {world}, expected {expected}", file=sys.stderr)
        return 3
    return status


if __name__ == "__main__":
    sys.exit(main())
