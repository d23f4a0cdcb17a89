"""Training throughput: the distdet trainer vs a bare torchvision loop, and 1 vs 2 processes.

Rows, side by side in one run (same model, data, batch size and optimizer):

- ``bare``: the tutorial's loop (DataLoader with shuffle, ``sum(loss_dict.values())``,
  ``zero_grad``/``backward``/``step``), 1 process;
- ``distdet``: ``train.py`` on 1 process;
- ``distdet 2proc``: ``accelerate launch`` with 2 processes (gloo);
- the bare loop and ``distdet`` once more with the other thread count, so that
  "1 process x 2 threads" and "2 processes x 1 thread" use the same cores;
- ``distdet-system``: ``distdet`` with ``--malloc system`` (the C library's allocator defaults,
  as before issue 17; every other row keeps freed memory, :mod:`distdet.runtime.malloc`).

``--recipe FILE`` (like for like) runs only ``bare`` and ``distdet``, both built from the same
``train.py --config FILE`` flags (plus any given after ``--``): the bare loop trains on the
trainer's own batches (``train_loops.trainer_batches``: same images, order and sizes, checked
against the trainer's ``--debug-record-samples``), the trainer runs the recipe as it is
(clipping, the non-finite agreement, logging). At least 3 interleaved pairs, the order
alternating per pair, the load average printed before and after each row.

Each row runs in its own process(es). Throughput is images per second over the steps after
``--warmup`` (global, all processes); data wait is the share of step time spent waiting for the
next batch; peak RSS is the largest resident memory of each training process (sampled every
0.1 s, DataLoader workers excluded). Rows are run ``--repeats`` times, interleaved, and the best
throughput is reported, to damp the noise of a shared machine (its load average is printed).

    PYTHONPATH=. python benchmarks/train_throughput.py            # defaults: a few minutes on 2 cores
    PYTHONPATH=. python benchmarks/train_throughput.py --steps 40 --repeats 3 --min-size 240
    PYTHONPATH=. python benchmarks/train_throughput.py --rows distdet,distdet-system \
        --model fasterrcnn_lite0_fpn --min-size 448 --max-size 768 --data-dir ../shared/facemask --workers 1
    PYTHONPATH=. python benchmarks/train_throughput.py --recipe configs/facemask_lite0_cpu.yaml \
        --steps 20 --warmup 10 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from train_loops import (  # noqa: E402 - benchmarks/ is on sys.path when run as a script
    bare_run, bare_step, child_env, free_port, measured_run_flags, same_batches, timed_loop, trainer_image_ids,
    trainer_throughput,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="fasterrcnn_mobilenet_v3_large_320_fpn")
    p.add_argument("--min-size", type=int, default=160)
    p.add_argument("--max-size", type=int, default=214)
    p.add_argument("--batch-size", type=int, default=4, help="images per step per process")
    p.add_argument("--box-batch-size-per-image", type=int, default=512,
                   help="proposals sampled per image for the box loss (torchvision's default 512)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers per process (the trainer's default)")
    p.add_argument("--steps", type=int, default=20, help="measured steps per row (after warmup)")
    p.add_argument("--warmup", type=int, default=4, help="steps not measured at the start of each row")
    p.add_argument("--repeats", type=int, default=2, help="runs per row, interleaved; the best is reported")
    p.add_argument("--data-dir", default=None, help="VOC folder (default: the synthetic default dataset)")
    p.add_argument("--rows", default="bare,distdet,distdet-2proc",
                   help="comma-separated rows: bare, distdet (1 process x 2 threads), bare-1t, distdet-1t "
                        "(1 x 1), distdet-2proc (2 processes x 1 thread), distdet-system (1 x 2, --malloc system)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--recipe", default=None, metavar="FILE",
                   help="like-for-like mode: rows bare and distdet only, both from train.py --config FILE plus the "
                        "train.py flags given after --; the bare loop trains on the trainer's own batches")
    p.add_argument("--threads", type=int, default=2, help="--recipe mode: OMP_NUM_THREADS of both rows")
    p.add_argument("train_flags", nargs="*", help="--recipe mode: train.py flags (after --) over the recipe's")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run the bare loop
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- the bare torchvision loop (runs in its own process) -------------------------------------------

def bare_loop(args: argparse.Namespace) -> None:
    import torch
    from torch.utils.data import DataLoader

    from distdet.classes import CLASS_NAMES
    from distdet.data import DetectionDataset, build_index, collate_detection, get_transforms
    from distdet.modeling.models import build_model
    from distdet.runtime.malloc import apply_malloc

    apply_malloc("keep")  # as the trainer's default, so the pair compares loops, not allocators
    torch.manual_seed(0)
    records = build_index(args.data_dir).records
    dataset = DetectionDataset(records, transforms=get_transforms("hflip", train=True))
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                        collate_fn=collate_detection)
    model = build_model(args.model, len(CLASS_NAMES), min_size=args.min_size, max_size=args.max_size,
                        box_batch_size_per_image=args.box_batch_size_per_image)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.005, momentum=0.9, weight_decay=5e-4)

    def epochs():
        while True:
            yield from loader

    cpu = torch.device("cpu")
    result = timed_loop(epochs(), bare_step(model, optimizer, cpu, "fp32"), args.steps, args.warmup, cpu)
    Path(args.out).write_text(json.dumps({k: result[k] for k in ("images_per_s", "data_wait_frac")}))


def bare_recipe_loop(args: argparse.Namespace) -> None:
    """``--recipe`` mode's bare row: the tutorial step on the trainer's own batches (train_loops)."""
    import torch

    from distdet.runtime.malloc import apply_malloc
    from distdet.training.config import parse_config

    cfg = parse_config(args.train_flags)
    apply_malloc(cfg.malloc)  # the allocator the trainer row uses, before anything is allocated
    precision = "bf16" if cfg.mixed_precision == "bf16" else "fp32"
    result = bare_run(cfg, torch.device("cpu"), precision, args.steps, args.warmup)
    Path(args.out).write_text(json.dumps(result))


# -- running rows -------------------------------------------------------------------------------------

class PeakRss:
    """Largest RSS of each training process from ``root_pid`` down (not launchers, not DataLoader workers)."""

    def __init__(self, root_pid: int, marker: str) -> None:
        import psutil

        self.psutil, self.root, self.marker = psutil, root_pid, marker
        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                root = self.psutil.Process(self.root)
                procs = [root] + root.children(recursive=True)
            except self.psutil.NoSuchProcess:
                return
            for proc in procs:
                try:
                    cmd = proc.cmdline()
                    parent = proc.parent()
                    if (any(self.marker in part for part in cmd) and "accelerate.commands.launch" not in cmd
                            and (parent is None or parent.cmdline() != cmd)):  # DataLoader workers are forks
                        self.peaks[proc.pid] = max(self.peaks.get(proc.pid, 0), proc.memory_info().rss)
                except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                    continue
            time.sleep(0.1)

    def stop(self) -> list[float]:
        self._stop.set()
        self._thread.join()
        return sorted(v / 2**20 for v in self.peaks.values())



def _run(cmd: list[str], env: dict[str, str], marker: str) -> tuple[list[float], str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    monitor = PeakRss(proc.pid, marker)
    output, _ = proc.communicate()
    peaks = monitor.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-3000:]}")
    return peaks, output


def run_bare(args: argparse.Namespace, threads: int, tmp: Path, extra_flags: list[str]) -> dict:
    out = tmp / f"bare_{threads}.json"
    cmd = [sys.executable, __file__, "--worker", "bare", "--out", str(out), "--data-dir", args.data_dir,
           "--model", args.model, "--min-size", str(args.min_size), "--max-size", str(args.max_size),
           "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--box-batch-size-per-image", str(args.box_batch_size_per_image)]
    peaks, _ = _run(cmd, child_env(threads), "train_throughput.py")
    return {**json.loads(out.read_text()), "peak_rss_mib": peaks}


def run_distdet(args: argparse.Namespace, threads: int, processes: int, tmp: Path, tag: str,
                extra_flags: list[str]) -> dict:
    run_dir = tmp / f"distdet_{tag}"
    per_rank_steps = args.warmup + args.steps
    train = [str(REPO / "train.py"), "--data-dir", args.data_dir, "--split-scheme", "stratified", "--test-fraction", "0.05",
             "--model", args.model, "--weights", "none", "--min-size", str(args.min_size), "--max-size",
             str(args.max_size), "--batch-size", str(args.batch_size), "--workers", str(args.workers),
             "--box-batch-size-per-image", str(args.box_batch_size_per_image),
             "--max-steps", str(per_rank_steps), "--epochs", "1000", "--log-every", "1", "--eval-every", "0",
             "--no-final-eval", "--no-progress", "--no-tensorboard", "--output-dir", str(run_dir)]
    if processes == 1:
        cmd = [sys.executable, *train]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "launch" / "accelerate" / "cpu_2proc.yaml"), "--num_processes", str(processes),
               "--main_process_port", str(free_port()), *train]
    peaks, _ = _run(cmd + extra_flags, child_env(threads), "train.py")
    return {**trainer_throughput(run_dir, args.warmup, args.batch_size * processes), "peak_rss_mib": peaks}

ROWS = {  # name: (processes, torch threads per process, runner, extra train.py flags)
    "bare": (1, 2, run_bare, []),
    "distdet": (1, 2, None, []),
    "bare-1t": (1, 1, run_bare, []),
    "distdet-1t": (1, 1, None, []),
    "distdet-2proc": (2, 1, None, []),
    "distdet-system": (1, 2, None, ["--malloc", "system"]),
}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker == "bare":
        bare_loop(args)
        return 0
    if args.worker == "bare-recipe":
        bare_recipe_loop(args)
        return 0
    if args.recipe:
        return like_for_like(args)
    if args.data_dir is None:
        from distdet.data.synthetic import default_data_dir

        args.data_dir = str(default_data_dir())
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    results: dict[str, list[dict]] = {r: [] for r in rows}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="distdet-bench-") as tmp_name:
        tmp = Path(tmp_name)
        for repeat in range(args.repeats):
            for row in rows:
                procs, threads, fn, extra_flags = ROWS[row]
                tag = f"{row}_{repeat}"
                result = (fn(args, threads, tmp, extra_flags) if fn
                          else run_distdet(args, threads, procs, tmp, tag, extra_flags))
                results[row].append(result)
                print(f"[{repeat + 1}/{args.repeats}] {row:14s} {result['images_per_s']:6.2f} img/s  "
                      f"data wait {100 * result['data_wait_frac']:4.1f}%  peak RSS {result['peak_rss_mib']}", flush=True)
    best = {row: max(rs, key=lambda r: r["images_per_s"]) for row, rs in results.items()}
    print(f"\nmodel {args.model}, min/max size {args.min_size}/{args.max_size}, batch {args.batch_size}/process, "
          f"box batch {args.box_batch_size_per_image}, "
          f"{args.workers} workers, {args.steps} measured steps; load average before {load_before[0]:.2f}, "
          f"after {os.getloadavg()[0]:.2f}")
    print(f"{'row':15s} {'procs x threads':>15s} {'img/s':>7s} {'data wait':>9s} {'peak RSS/process (MiB)':>24s}")
    for row, r in best.items():
        procs, threads, _, _ = ROWS[row]
        print(f"{row:15s} {f'{procs} x {threads}':>15s} {r['images_per_s']:7.2f} {100 * r['data_wait_frac']:8.1f}% "
              f"{', '.join(f'{m:.0f}' for m in r['peak_rss_mib']):>24s}")
    summary = {}
    for bare_row, ours in (("bare", "distdet"), ("bare-1t", "distdet-1t")):
        if bare_row in best and ours in best:
            summary[f"{ours} / {bare_row} (overhead ratio)"] = best[ours]["images_per_s"] / best[bare_row]["images_per_s"]
    if "distdet-2proc" in best and "distdet" in best:
        summary["distdet-2proc (2 x 1t) / distdet (1 x 2t)"] = (best["distdet-2proc"]["images_per_s"]
                                                              / best["distdet"]["images_per_s"])
    if "distdet-system" in best and "distdet" in best:
        summary["distdet / distdet-system (--malloc keep vs system)"] = (best["distdet"]["images_per_s"]
                                                                     / best["distdet-system"]["images_per_s"])
    for name, ratio in summary.items():
        print(f"{name}: {ratio:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results, "best": best,
                                               "ratios": summary, "load_before": load_before}, indent=1))
    return 0


# -- like-for-like mode (--recipe) ------------------------------------------------------------------

def recipe_flags(args: argparse.Namespace) -> list[str]:
    """The train.py flags both rows of ``--recipe`` mode are built from."""
    return ["--config", args.recipe, *(["--data-dir", args.data_dir] if args.data_dir else []), *args.train_flags]


def run_recipe_row(row: str, args: argparse.Namespace, flags: list[str], batch_size: int, tmp: Path,
                   tag: str) -> dict:
    if row == "bare":
        out = tmp / f"{tag}.json"
        cmd = [sys.executable, __file__, "--worker", "bare-recipe", "--out", str(out), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--", *flags]
        peaks, _ = _run(cmd, child_env(args.threads), "train_throughput.py")
        return {**json.loads(out.read_text()), "peak_rss_mib": peaks}
    run_dir = tmp / tag
    cmd = [sys.executable, str(REPO / "train.py"), *flags, *measured_run_flags(args.warmup + args.steps, run_dir)]
    peaks, _ = _run(cmd, child_env(args.threads), "train.py")
    return {**trainer_throughput(run_dir, args.warmup, batch_size), "image_ids": trainer_image_ids(run_dir),
            "peak_rss_mib": peaks}


def like_for_like(args: argparse.Namespace) -> int:
    """Interleaved bare/distdet pairs on identical batches (order alternating per pair); 1 if batches differ."""
    from distdet.training.config import parse_config

    flags = recipe_flags(args)
    cfg = parse_config(flags)  # a bad flag or recipe exits 2 here, naming it
    problems = [f"--{name} {getattr(args, name)} must be a multiple of the recipe's --log-every {cfg.log_every} "
                f"(the trainer's logged windows must separate warmup from measured steps)"
                for name in ("warmup", "steps") if getattr(args, name) % cfg.log_every]
    if args.repeats < 3:
        problems.append(f"--repeats {args.repeats}: --recipe needs at least 3 interleaved pairs")
    if problems:
        print("train_throughput.py: error: " + "; ".join(problems), file=sys.stderr)
        return 2
    pairs = []
    with tempfile.TemporaryDirectory(prefix="distdet-bench-") as tmp_name:
        for pair in range(args.repeats):
            results: dict = {}
            for row in ("bare", "distdet") if pair % 2 == 0 else ("distdet", "bare"):
                before = os.getloadavg()[0]
                results[row] = run_recipe_row(row, args, flags, cfg.batch_size, Path(tmp_name), f"{row}_{pair}")
                results[row]["load_average"] = [before, os.getloadavg()[0]]
                print(f"[pair {pair + 1}/{args.repeats}] {row:8s} {results[row]['images_per_s']:7.3f} img/s  "
                      f"data wait {100 * results[row]['data_wait_frac']:4.1f}%  "
                      f"load average {before:.2f} -> {results[row]['load_average'][1]:.2f}", flush=True)
            results["ratio"] = results["distdet"]["images_per_s"] / results["bare"]["images_per_s"]
            results["same_batches"] = same_batches(results["bare"].pop("image_ids"),
                                                   results["distdet"].pop("image_ids"))
            pairs.append(results)
    ratios = sorted(p["ratio"] for p in pairs)
    same = all(p["same_batches"] for p in pairs)
    print(f"\nrecipe {args.recipe} {' '.join(args.train_flags)}: {args.warmup} warmup + {args.steps} measured steps, "
          f"batch {cfg.batch_size}, {args.threads} threads, {args.repeats} interleaved pairs")
    per_pair = ", ".join(f"{p['ratio']:.3f}" for p in pairs)
    print(f"distdet / bare per pair: {per_pair}; median {ratios[len(ratios) // 2]:.3f}"
          f" (min {ratios[0]:.3f}, max {ratios[-1]:.3f}); identical batches in every pair: {'yes' if same else 'NO'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "pairs": pairs, "median_ratio": ratios[len(ratios) // 2],
                                               "same_batches": same}, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
