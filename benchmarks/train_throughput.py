"""Training throughput: the distdet trainer vs a bare torchvision loop, and 1 vs 2 processes.

Rows, side by side in one run (same model, data, batch size and optimizer):

- ``bare``: the tutorial's loop (DataLoader with shuffle, ``sum(loss_dict.values())``,
  ``zero_grad``/``backward``/``step``), 1 process;
- ``distdet``: ``train.py`` on 1 process;
- ``distdet 2proc``: ``accelerate launch`` with 2 processes (gloo);
- the bare loop and ``distdet`` once more with the other thread count, so that
  "1 process x 2 threads" and "2 processes x 1 thread" use the same cores;
- ``distdet-malloc``: ``distdet`` with glibc's allocator told to keep freed memory
  (:data:`MALLOC_TUNING`: no trimming, a fixed 32 MiB mmap threshold, 1 GiB top pad), so the
  large activation buffers of each step are reused instead of unmapped and faulted in again.

Each row runs in its own process(es). Throughput is images per second over the steps after
``--warmup`` (global, all processes); data wait is the share of step time spent waiting for the
next batch; peak RSS is the largest resident memory of each training process (sampled every
0.1 s, DataLoader workers excluded). Rows are run ``--repeats`` times, interleaved, and the best
throughput is reported, to damp the noise of a shared machine (its load average is printed).

    PYTHONPATH=. python benchmarks/train_throughput.py            # defaults: a few minutes on 2 cores
    PYTHONPATH=. python benchmarks/train_throughput.py --steps 40 --repeats 3 --min-size 240
    PYTHONPATH=. python benchmarks/train_throughput.py --rows distdet,distdet-malloc \
        --model fasterrcnn_lite0_fpn --min-size 448 --max-size 768 --data-dir ../shared/facemask --workers 1
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
                        "(1 x 1), distdet-2proc (2 processes x 1 thread), distdet-malloc (1 x 2, tuned malloc)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
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
    total = args.warmup + args.steps
    step, data_time, start = 0, 0.0, None
    while step < total:
        batches = iter(loader)
        while step < total:
            t0 = time.perf_counter()
            try:
                images, targets = next(batches)
            except StopIteration:
                break
            waited = time.perf_counter() - t0
            if step == args.warmup:
                start, data_time = t0, 0.0
            if start is not None:
                data_time += waited
            loss = sum(model(list(images), list(targets)).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
    elapsed = time.perf_counter() - start
    Path(args.out).write_text(json.dumps({"images_per_s": args.steps * args.batch_size / elapsed,
                                          "data_wait_frac": data_time / elapsed}))


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


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


#: glibc malloc settings of the ``distdet-malloc`` row (read by glibc at process start).
MALLOC_TUNING = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "17179869184",
                 "MALLOC_TOP_PAD_": "1073741824"}


def _env(threads: int, extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = str(threads)
    env.update(extra)
    return env


def _run(cmd: list[str], env: dict[str, str], marker: str) -> tuple[list[float], str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    monitor = PeakRss(proc.pid, marker)
    output, _ = proc.communicate()
    peaks = monitor.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-3000:]}")
    return peaks, output


def run_bare(args: argparse.Namespace, threads: int, tmp: Path, extra_env: dict[str, str]) -> dict:
    out = tmp / f"bare_{threads}.json"
    cmd = [sys.executable, __file__, "--worker", "bare", "--out", str(out), "--data-dir", args.data_dir,
           "--model", args.model, "--min-size", str(args.min_size), "--max-size", str(args.max_size),
           "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--box-batch-size-per-image", str(args.box_batch_size_per_image)]
    peaks, _ = _run(cmd, _env(threads, extra_env), "train_throughput.py")
    return {**json.loads(out.read_text()), "peak_rss_mib": peaks}


def run_distdet(args: argparse.Namespace, threads: int, processes: int, tmp: Path, tag: str,
                extra_env: dict[str, str]) -> dict:
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
               "--main_process_port", str(_free_port()), *train]
    peaks, _ = _run(cmd, _env(threads, extra_env), "train.py")
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if r["kind"] == "train" and r["step"] > args.warmup]
    # every window is one step here: time = images / (images/s)
    images = sum(args.batch_size * processes for _ in records)
    seconds = sum(args.batch_size * processes / r["images_per_s"] for r in records)
    data = sum(r["data_wait_frac"] * args.batch_size * processes / r["images_per_s"] for r in records)
    return {"images_per_s": images / seconds, "data_wait_frac": data / seconds, "peak_rss_mib": peaks}


ROWS = {  # name: (processes, torch threads per process, runner, extra environment)
    "bare": (1, 2, run_bare, {}),
    "distdet": (1, 2, None, {}),
    "bare-1t": (1, 1, run_bare, {}),
    "distdet-1t": (1, 1, None, {}),
    "distdet-2proc": (2, 1, None, {}),
    "distdet-malloc": (1, 2, None, MALLOC_TUNING),
}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker == "bare":
        bare_loop(args)
        return 0
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
                procs, threads, fn, extra_env = ROWS[row]
                tag = f"{row}_{repeat}"
                result = (fn(args, threads, tmp, extra_env) if fn
                          else run_distdet(args, threads, procs, tmp, tag, extra_env))
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
    if "distdet-malloc" in best and "distdet" in best:
        summary["distdet-malloc / distdet (tuned glibc malloc)"] = (best["distdet-malloc"]["images_per_s"]
                                                                    / best["distdet"]["images_per_s"])
    for name, ratio in summary.items():
        print(f"{name}: {ratio:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results, "best": best,
                                               "ratios": summary, "load_before": load_before}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
