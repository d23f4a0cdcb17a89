"""Training-script stand-in for the launcher tests: reports what each process was given.

Every process writes `OUTPUT_DIR/probe-restart<R>-rank<K>.json` with its Accelerate rank and
process count, torch.distributed's world size and backend, its argv and the launcher variables
it sees. With `--wait-for-usr1` a first run (SLURM_RESTART_COUNT unset or 0) installs a SIGUSR1
handler, marks itself ready (`ready-rank<K>`), waits for the signal, and then rank 0 requeues
the job with `scontrol requeue` — the contract the trainer follows on a Slurm warning signal.
With `--fail-rank K --fail-how raise|kill`, rank K raises an error (or SIGKILLs itself) while
the other ranks wait in a collective: the launcher must end the job, naming rank K.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator


def _all_reduce_sum(value: float) -> float:
    tensor = torch.tensor([value])
    dist.all_reduce(tensor)
    return float(tensor.item())


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--wait-for-usr1", action="store_true")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--fail-rank", type=int, default=None)
    parser.add_argument("--fail-how", choices=["raise", "kill"], default="raise")
    args, extra = parser.parse_known_args()

    got_signal = []
    signal.signal(signal.SIGUSR1, lambda signum, frame: got_signal.append(signum))
    accelerator = Accelerator()
    rank = accelerator.process_index
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "rank": rank,
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "dist_world_size": dist.get_world_size() if dist.is_initialized() else None,
        "dist_backend": dist.get_backend() if dist.is_initialized() else None,
        "all_reduce_sum": _all_reduce_sum(rank + 1.0) if dist.is_initialized() else None,
        "resume": args.resume,
        "extra_args": extra,
        "restart": restart,
        "pid": os.getpid(),
        "env": {k: os.environ.get(k) for k in (
            "LOCAL_WORLD_SIZE", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID",
            "SLURM_NODEID", "SLURMD_NODENAME", "ACCELERATE_USE_CPU", "OMP_NUM_THREADS")},
    }
    if args.fail_rank is not None:
        (args.output_dir / f"probe-restart{restart}-rank{rank}.json").write_text(json.dumps(report, indent=1))
        accelerator.wait_for_everyone()
        if rank == args.fail_rank:
            if args.fail_how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"probe failure injected on rank {rank}")
        accelerator.wait_for_everyone()  # the others block here until the launcher ends them
        return 0
    if args.wait_for_usr1 and restart == 0:
        (args.output_dir / f"ready-rank{rank}").write_text(str(os.getpid()))
        deadline = time.monotonic() + args.timeout
        while not got_signal and time.monotonic() < deadline:
            time.sleep(0.1)
        report["got_usr1"] = bool(got_signal)
        accelerator.wait_for_everyone()
    (args.output_dir / f"probe-restart{restart}-rank{rank}.json").write_text(json.dumps(report, indent=1))
    if args.wait_for_usr1 and restart == 0 and rank == 0 and got_signal:
        subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=True)
    accelerator.wait_for_everyone()
    if dist.is_initialized():
        dist.destroy_process_group()  # as the trainer does: no rank outlives the store it talks to
    return 0 if (not args.wait_for_usr1 or restart > 0 or got_signal) else 1


if __name__ == "__main__":
    sys.exit(main())
