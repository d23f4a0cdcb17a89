"""Where a CPU training step of the real recipe goes: step time, user/kernel CPU and page faults.

Issue 17 asked why the real-data recipe (``configs/facemask_lite0_cpu.yaml``) stepped at
3.4-3.9 s per 4 images while ``lite0_step_time.py`` (two fixed images, batch 2) predicts about
2.3 s, with 22 % of its CPU time in the kernel. Each row below runs in its own process, on the
recipe's own batches (``train_loops.trainer_batches``), and changes ONE thing:

- ``step-bench``: the bare step on ``lite0_step_time.py``'s two images (512x366, batch 2),
  repeated: that benchmark's measurement, in this run;
- ``fixed``: the bare step on the recipe's first batch of 4, repeated (one shape every step, as
  the step benchmark, at the recipe's batch size);
- ``bare``: the bare step on the recipe's batches (shapes change every step), DataLoader
  workers as the recipe (``--workers 1``);
- ``bare-w0``: the same with the batches loaded in the training process (no worker process
  competing for the 2 cores);
- ``trainer``: ``train.py`` on the recipe as it is;
- ``trainer-2x1``: the recipe on 2 gloo processes of 1 thread each (``accelerate launch``, half
  the batch per process: the same global batch of 4 and lr), on the same 2 cores;
- ``<row>-<alloc>``: any of these with another allocator (:data:`ALLOCATORS`), e.g.
  ``bare-system``: the C library's defaults, as every row ran before issue 17.

Bare rows time every measured step in the process (median and mean s/step, user and system
CPU seconds and minor page faults per step from ``getrusage`` over the measured steps only,
DataLoader workers excluded). Trainer rows report the trainer's own images/s over its logged
windows after warmup, and the whole run's CPU and faults per step from ``wait4`` (startup and
DataLoader workers included). Rows are interleaved over ``--rounds``; the table gives the
median of the rounds and the load average before and after each row.

    PYTHONPATH=. python benchmarks/step_gap.py --rows fixed-system,bare-system,bare-w0-system,bare,trainer-system,trainer
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CPU_2PROC = REPO / "launch" / "accelerate" / "cpu_2proc.yaml"
sys.path.insert(0, str(REPO))

from train_loops import bare_step, child_env, free_port, measured_run_flags, trainer_batches, trainer_throughput  # noqa: E402

#: Allocator variants a row name can end with: extra train.py flags and environment (read at
#: process start). Without a suffix a row uses the recipe's ``--malloc`` (distdet's default
#: ``keep``: glibc reuses its freed blocks, :mod:`distdet.runtime.malloc`). ``system``: the C
#: library's defaults (before issue 17). ``envkeep``: ``keep``'s two settings given to glibc through
#: its environment at process start instead of ``mallopt`` once the trainer starts. ``thp``: those defaults plus glibc's transparent huge
#: pages (glibc >= 2.35), so a fault maps 2 MiB instead of 4 KiB. ``jemalloc``: jemalloc
#: preloaded (Debian ``libjemalloc2``, or the copy named by ``JEMALLOC_SO``) with its defaults.
ALLOCATORS = {
    "system": (["--malloc", "system"], {}),
    "envkeep": (["--malloc", "system"], {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "17179869184"}),
    "thp": (["--malloc", "system"], {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}),
    "jemalloc": ([], {"LD_PRELOAD": os.environ.get("JEMALLOC_SO", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")}),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=str(REPO / "configs" / "facemask_lite0_cpu.yaml"))
    p.add_argument("--rows", default="fixed,bare,bare-w0,trainer")
    p.add_argument("--steps", type=int, default=20, help="measured steps per row (a multiple of --log-every)")
    p.add_argument("--warmup", type=int, default=10, help="steps not measured (a multiple of --log-every)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved runs of every row; the median is reported")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of every row")
    p.add_argument("--json", default=None)
    p.add_argument("train_flags", nargs="*", help="train.py flags (after --) over the recipe's")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one bare row
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


KINDS = ("bare-w0", "step-bench", "fixed", "bare", "trainer-2x1", "trainer")


def split_row(row: str) -> tuple[str, list[str], dict[str, str]]:
    """``"trainer-system"`` -> (``"trainer"``, its extra flags, its environment); a bad name exits naming it."""
    for kind in KINDS:
        if row == kind:
            return kind, [], {}
        if row.startswith(kind + "-") and row[len(kind) + 1:] in ALLOCATORS:
            return (kind, *ALLOCATORS[row[len(kind) + 1:]])
    raise SystemExit(f"unknown row {row!r}: rows are {', '.join(KINDS)}, optionally followed by "
                     f"-{' or -'.join(ALLOCATORS)}")


def bare_worker(args: argparse.Namespace, kind: str) -> None:
    """One bare row in this process: per-step wall time and getrusage over the measured steps."""
    import torch

    from distdet.classes import CLASS_NAMES
    from distdet.modeling.models import build_model
    from distdet.runtime.malloc import apply_malloc
    from distdet.training.config import parse_config

    cfg = parse_config(["--config", args.recipe, *args.train_flags, *(["--workers", "0"] if kind == "bare-w0" else [])])
    apply_malloc(cfg.malloc)  # as the trainer does, before anything is allocated
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, len(CLASS_NAMES), weights=cfg.weights, backbone_weights=cfg.backbone_weights,
                        min_size=cfg.min_size, max_size=cfg.max_size,
                        trainable_backbone_layers=cfg.trainable_backbone_layers).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    step = bare_step(model, optimizer, torch.device("cpu"), "fp32")
    batches = trainer_batches(cfg)
    first = step_bench_batch(cfg.data_dir) if kind == "step-bench" else next(batches)
    times, usage = [], None
    for index in range(args.warmup + args.steps):
        if index == args.warmup:
            usage = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        images, targets = first if kind in ("fixed", "step-bench") else next(batches)
        step(images, targets)
        times.append(time.perf_counter() - start)
    end = resource.getrusage(resource.RUSAGE_SELF)
    batches.close()
    measured = times[args.warmup:]
    Path(args.out).write_text(json.dumps({
        "s_per_step": statistics.median(measured), "mean_s_per_step": statistics.fmean(measured),
        "user_s_per_step": (end.ru_utime - usage.ru_utime) / args.steps,
        "sys_s_per_step": (end.ru_stime - usage.ru_stime) / args.steps,
        "minor_faults_per_step": (end.ru_minflt - usage.ru_minflt) / args.steps,
        "images_per_step": len(first[0]), "batch_shape": list(first[0][0].shape)}))


def step_bench_batch(data_dir: str | None):
    """``lite0_step_time.py``'s two images and boxes, as one batch."""
    from lite0_step_time import STEMS, _load

    from distdet.data.synthetic import resolve_data_dir

    samples = [_load(stem, resolve_data_dir(data_dir)) for stem in STEMS]
    return [s[0] for s in samples], [s[1] for s in samples]


def run_child(cmd: list[str], env: dict[str, str]) -> resource.struct_rusage:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-3000:]}")
    return usage


def run_row(row: str, args: argparse.Namespace, tmp: Path, tag: str, batch_size: int) -> dict:
    kind, extra_flags, extra_env = split_row(row)
    env = child_env(args.threads, extra_env)
    flags = [*args.train_flags, *extra_flags]
    if not kind.startswith("trainer"):
        out = tmp / f"{tag}.json"
        run_child([sys.executable, __file__, "--worker", kind, "--out", str(out), "--recipe", args.recipe,
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--", *flags], env)
        return json.loads(out.read_text())
    run_dir = tmp / tag
    total_steps = args.warmup + args.steps
    train = [str(REPO / "train.py"), "--config", args.recipe, *flags, *measured_run_flags(total_steps, run_dir)]
    if kind == "trainer-2x1":
        env = child_env(1, extra_env)
        train = ["-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC), "--num_processes", "2",
                 "--main_process_port", str(free_port()), *train, "--batch-size", str(batch_size // 2)]
    usage = run_child([sys.executable, *train], env)
    speed = trainer_throughput(run_dir, args.warmup, batch_size)
    return {"s_per_step": batch_size / speed["images_per_s"], "mean_s_per_step": batch_size / speed["images_per_s"],
            "user_s_per_step": usage.ru_utime / total_steps, "sys_s_per_step": usage.ru_stime / total_steps,
            "minor_faults_per_step": usage.ru_minflt / total_steps, "whole_run": True}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        bare_worker(args, args.worker)
        return 0
    from distdet.training.config import parse_config

    cfg = parse_config(["--config", args.recipe, *args.train_flags])
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    for row in rows:
        split_row(row)
    results: dict[str, list[dict]] = {row: [] for row in rows}
    with tempfile.TemporaryDirectory(prefix="distdet-gap-") as tmp:
        for rnd in range(args.rounds):
            for row in rows if rnd % 2 == 0 else rows[::-1]:
                before = os.getloadavg()[0]
                result = run_row(row, args, Path(tmp), f"{row}_{rnd}", cfg.batch_size)
                result["load_average"] = [before, os.getloadavg()[0]]
                results[row].append(result)
                print(f"[round {rnd + 1}/{args.rounds}] {row:16s} {result['s_per_step']:6.2f} s/step  "
                      f"sys {result['sys_s_per_step']:5.2f} s  faults {result['minor_faults_per_step']:9.0f}  "
                      f"load {before:.2f} -> {result['load_average'][1]:.2f}", flush=True)
    print_table(args, cfg, results)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    return 0


def print_table(args: argparse.Namespace, cfg, results: dict[str, list[dict]]) -> None:
    from distdet.training.config import comma_text

    def med(row: str, key: str) -> float:
        return statistics.median(r[key] for r in results[row])

    base = "bare" if "bare" in results else next(iter(results))
    sizes = comma_text(cfg.min_size)  # one size, or a multi-scale list
    print(f"\nrecipe {args.recipe} {' '.join(args.train_flags)}: batch {cfg.batch_size}, min/max size "
          f"{sizes}/{cfg.max_size}, {args.threads} threads, {args.warmup} warmup + {args.steps} measured "
          f"steps, median of {args.rounds} interleaved rounds")
    print(f"| row | s/step | s per {cfg.batch_size} images | vs {base} | user CPU s/step | system CPU s/step | minor faults/step | load average |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for row in results:
        whole = " (whole run)" if results[row][0].get("whole_run") else ""
        loads = ", ".join(f"{r['load_average'][0]:.2f}-{r['load_average'][1]:.2f}" for r in results[row])
        per_batch = med(row, "s_per_step") * cfg.batch_size / results[row][0].get("images_per_step", cfg.batch_size)
        print(f"| {row} | {med(row, 's_per_step'):.2f} | {per_batch:.2f} | {med(base, 's_per_step') / med(row, 's_per_step'):.3f}x | "
              f"{med(row, 'user_s_per_step'):.2f}{whole} | {med(row, 'sys_s_per_step'):.2f}{whole} | "
              f"{med(row, 'minor_faults_per_step'):,.0f}{whole} | {loads} |")


if __name__ == "__main__":
    sys.exit(main())
