"""The GPU check: bare loop vs the distdet trainer, fp32 / TF32 / bf16 / fp16, batch 4 and the largest batch.

One command, one table, one JSON file (rewritten after every row, so a killed run keeps what
it measured). Models: ``fasterrcnn_lite0_fpn`` with its shipped ImageNet backbone (the recipe's
model; needs the ``lite`` extra), ``fasterrcnn_resnet50_fpn`` and ``fasterrcnn_resnet50_fpn_v2``
from random weights. For each model and precision, at ``--batch-size`` and at the largest batch
that fits (doubling from it up to ``--max-batch-cap``; a CUDA out-of-memory error ends the
search, found once per memory class: fp32 for fp32/TF32, bf16 for bf16/fp16):

- ``bare``: the tutorial's step on the trainer's own batches (``train_loops.bare_run``), in
  this process; ``trainer``: ``train.py`` in a child process (peak GPU memory read there);
- images/s over ``--steps`` after ``--warmup``, data-wait share, peak
  ``torch.cuda.max_memory_allocated``, the row's wall time;
- ratio rows: each precision / fp32, and trainer / bare (with whether both saw identical batches);
- ``nan-check``: a trainer run in fp16 (fp32 on CPU) whose loss is poisoned at ``--nan-step``
  (``--debug-nan-at-step``); it passes when exactly that step is reported skipped and the run
  finishes; the fp16 gradient scaler's own skips are counted (steps - updates - 1).

Rows run in order of value (batch-4 fp32/bf16 first, then the NaN check, TF32/fp16, then the
largest batches) within ``--budget-s``: a row whose estimated time (from the rows already run)
exceeds what is left is skipped and listed, and a row that runs over is cut at the budget.

    python benchmarks/gpu_check.py --data-dir .carry/facemask --json $OUT/gpu_check.json   # on the GPU
    python benchmarks/gpu_check.py --dry-run --json /tmp/gpu_check.json                   # CPU, seconds
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from train_loops import (  # noqa: E402 - benchmarks/ is on sys.path when run as a script
    CUDA_ONLY, PRECISION_FLAGS, PRECISIONS, bare_run, child_env, measured_run_flags, read_jsonl, same_batches,
    trainer_image_ids, trainer_throughput,
)
from distdet.training.config import comma_text, size_list_argument  # noqa: E402 - torch-free

GPU_MODELS = ("fasterrcnn_lite0_fpn", "fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2")
DRY_MODELS = ("fasterrcnn_mobilenet_v3_large_320_fpn",)
IMAGENET_BACKBONE = {"fasterrcnn_lite0_fpn"}  # shipped with the lite extra; the others start from random weights
#: seconds assumed for the first row of a loop (H200 guesses, generous; later rows use measured times)
PRIOR_S = {"bare": 40.0, "trainer": 90.0, "nan-check": 90.0}
MEMORY_CLASS = {"fp32": "fp32", "tf32": "fp32", "bf16": "bf16", "fp16": "bf16"}
DRY_RUN = {"device": "cpu", "min_size": [64], "max_size": 96, "batch_size": 2, "max_batch_cap": 4, "steps": 2,
           "warmup": 1, "log_every": 1, "workers": 0, "budget_s": 600.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    p.add_argument("--dry-run", action="store_true",
                   help=f"tiny sizes on CPU to check the script itself ({DRY_RUN}; model {DRY_MODELS[0]})")
    p.add_argument("--data-dir", default=None, help="VOC folder (default: the synthetic default dataset)")
    p.add_argument("--models", default=None, help=f"comma-separated (default: {','.join(GPU_MODELS)})")
    p.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated subset of fp32,tf32,bf16,fp16")
    p.add_argument("--min-size", type=size_list_argument, default=[800],
                   help="short side(s), as train.py --min-size takes them (384,448,512: multi-scale)")
    p.add_argument("--max-size", type=int, default=1333)
    p.add_argument("--batch-size", type=int, default=4, help="the tutorial's batch")
    p.add_argument("--max-batch-cap", type=int, default=64, help="largest batch tried (0 = no largest-batch rows)")
    p.add_argument("--steps", type=int, default=20, help="measured steps per row")
    p.add_argument("--warmup", type=int, default=5, help="unmeasured steps at the start of each row")
    p.add_argument("--log-every", type=int, default=5, help="the trainer's --log-every (divides --warmup and --steps)")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers, both loops")
    p.add_argument("--nan-step", type=int, default=2, help="the step whose loss the NaN check poisons")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="wall-time budget of all rows (default 7 min, inside the 8-minute allowance)")
    p.add_argument("--json", default="runs/gpu_check.json", help="results file (default: runs/gpu_check.json)")
    p.add_argument("--worker-trainer", default=None, help=argparse.SUPPRESS)  # internal: OUT of a trainer child
    p.add_argument("train_flags", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dry_run:
        given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:])}
        for name, value in DRY_RUN.items():
            if "--" + name.replace("_", "-") not in given:
                setattr(args, name, value)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.models = args.models.split(",") if args.models else list(DRY_MODELS if args.dry_run else GPU_MODELS)
    args.precisions = [x for x in args.precisions.split(",") if x]
    from distdet.modeling.models import MODEL_NAMES

    unknown = [m for m in args.models if m not in MODEL_NAMES]
    if unknown:
        p.error(f"--models: unknown {unknown}; choose from {', '.join(MODEL_NAMES)}")
    bad = [x for x in args.precisions if x not in PRECISIONS]
    if bad:
        p.error(f"--precisions: unknown {bad}; choose from {', '.join(PRECISIONS)}")
    if args.warmup % args.log_every or args.steps % args.log_every:
        p.error(f"--log-every {args.log_every} must divide --warmup {args.warmup} and --steps {args.steps}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible (use --device cpu or --dry-run)")
    return args


@dataclass
class Row:
    model: str
    precision: str
    batch: str  # "base" (--batch-size) or "max" (the largest that fits)
    loop: str  # "bare", "trainer" or "nan-check"
    status: str = "pending"
    batch_size: int | None = None
    images_per_s: float | None = None
    data_wait_frac: float | None = None
    peak_mem_mib: float | None = None
    wall_s: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.model} {self.precision} batch {self.batch_size or self.batch} {self.loop}"


def plan_rows(args: argparse.Namespace) -> list[Row]:
    """Rows in order of value: batch-4 fp32/bf16, the NaN check, batch-4 TF32/fp16, then largest batches."""
    tiers = [(("fp32", "bf16"), "base"), "nan", (("tf32", "fp16"), "base")]
    if args.max_batch_cap > args.batch_size:
        tiers += [(("fp32", "bf16"), "max"), (("tf32", "fp16"), "max")]
    rows = []
    for tier in tiers:
        if tier == "nan":
            rows.append(Row(args.models[0], "fp16" if args.device == "cuda" else "fp32", "base", "nan-check"))
            continue
        precisions, batch = tier
        rows += [Row(model, precision, batch, loop) for model in args.models for precision in precisions
                 if precision in args.precisions for loop in ("bare", "trainer")]
    return rows


class GpuCheck:
    """Runs the planned rows within the budget and records everything in ``self.report``."""

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args, self.tmp = args, tmp
        self.device = torch.device(args.device)
        self.deadline = time.monotonic() + args.budget_s
        self.rows = plan_rows(args)
        self.largest: dict[tuple[str, str], dict[str, Any]] = {}  # (model, memory class) -> search result
        self.image_ids: dict[tuple[str, str, int], list[list[int]]] = {}  # bare rows' batches

    # -- flags and estimates ------------------------------------------------------------------------

    def train_flags(self, model: str, precision: str, batch_size: int) -> list[str]:
        a = self.args
        flags = ["--split-scheme", "stratified", "--test-fraction", "0.05", "--model", model, "--weights", "none",
                 "--backbone-weights", "imagenet" if model in IMAGENET_BACKBONE else "none",
                 "--min-size", comma_text(a.min_size), "--max-size", str(a.max_size), "--batch-size", str(batch_size),
                 "--workers", str(a.workers), "--log-every", str(a.log_every), "--no-progress", "--no-tensorboard",
                 *PRECISION_FLAGS[precision], *(["--data-dir", a.data_dir] if a.data_dir else [])]
        return flags + (["--cpu"] if self.device.type == "cpu" else [])

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def estimate(self, row: Row, batch_size: int) -> float:
        """Seconds the row should take: fixed cost + steps at the throughput of the last similar row."""
        steps = self.args.warmup + self.args.steps
        same_loop = [r for r in self.rows if r.loop == row.loop and r.images_per_s]
        done = [r for r in same_loop if r.model == row.model]
        if not done:  # a new model: twice the slowest row of its loop so far, or the prior
            return min(PRIOR_S[row.loop], 2 * max(r.wall_s for r in same_loop)) if same_loop else PRIOR_S[row.loop]
        ref = done[-1]
        stepping = steps * ref.batch_size / ref.images_per_s
        return max(0.0, ref.wall_s - stepping) + steps * batch_size / ref.images_per_s

    # -- running ---------------------------------------------------------------------------------------

    def run(self) -> None:
        for row in self.rows:
            if row.precision in CUDA_ONLY and self.device.type != "cuda":
                row.status = "not applicable on CPU"
                continue
            try:
                self.run_row(row)
            except Exception as exc:  # noqa: BLE001 - one failed row must not end the check
                traceback.print_exc()
                row.status = f"failed: {type(exc).__name__}: {exc}"
            self.write_json()

    def run_row(self, row: Row) -> None:
        """Run one row, or say why it is not run (budget, no larger batch)."""
        batch_size = self.args.batch_size if row.batch == "base" else self.largest_batch(row)
        if batch_size is None:
            tried = self.largest[(row.model, MEMORY_CLASS[row.precision])]["tried"]
            row.status = f"not run: no batch above --batch-size ran (search: {tried})"
            return
        row.batch_size = batch_size
        needed = self.estimate(row, batch_size)
        if needed > self.left():
            row.status = f"skipped: needs ~{needed:.0f} s, {max(self.left(), 0):.0f} s of the budget left"
            print(f"-- {row.name}: {row.status}", flush=True)
            return
        start = time.monotonic()
        try:
            {"bare": self.run_bare, "trainer": self.run_trainer, "nan-check": self.run_nan_check}[row.loop](row)
        finally:
            row.wall_s = time.monotonic() - start
        print(f"-- {row.name}: {row.status}, {fmt(row.images_per_s, '.2f')} img/s, "
              f"{row.wall_s:.1f} s", flush=True)

    def run_bare(self, row: Row) -> None:
        from distdet.training.config import parse_config

        cfg = parse_config(self.train_flags(row.model, row.precision, row.batch_size))
        try:
            result = bare_run(cfg, self.device, row.precision, self.args.steps, self.args.warmup, self.deadline)
        except torch.cuda.OutOfMemoryError:
            row.status = "CUDA out of memory"
            return
        finally:
            free_cuda_cache()
        self.image_ids[(row.model, row.precision, row.batch_size)] = result["image_ids"]
        if result["cut"]:
            row.status = "cut at the budget"
            return
        row.status, row.images_per_s, row.data_wait_frac = "ok", result["images_per_s"], result["data_wait_frac"]
        row.peak_mem_mib = result.get("peak_mem_mib")

    def train_child(self, row: Row, extra: list[str], max_steps: int) -> tuple[Path, str | None]:
        """Run train.py (through this script's trainer worker) for ``row``; the run folder and an error, if any."""
        run_dir = self.tmp / f"{row.model}_{row.precision}_{row.batch_size}_{row.loop}"
        out = run_dir.with_suffix(".peak.json")
        flags = [*self.train_flags(row.model, row.precision, row.batch_size), *extra,
                 *measured_run_flags(max_steps, run_dir)]
        cmd = [sys.executable, __file__, "--worker-trainer", str(out), "--", *flags]
        log = run_dir.with_suffix(".log")
        with open(log, "w") as handle:
            proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=child_env(),
                                    start_new_session=True)
            try:
                code = proc.wait(timeout=max(self.left(), 1.0))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return run_dir, "cut at the budget"
        if out.is_file():
            row.peak_mem_mib = json.loads(out.read_text())["peak_mem_mib"]
        if code == 0:
            return run_dir, None
        text = log.read_text()
        print(f"   train.py exited {code}; the end of its log:\n" + "\n".join(text.splitlines()[-15:]), flush=True)
        if "OutOfMemoryError" in text or "CUDA out of memory" in text:
            return run_dir, "CUDA out of memory"
        return run_dir, f"failed: train.py exited {code} (log above)"

    def run_trainer(self, row: Row) -> None:
        run_dir, error = self.train_child(row, [], self.args.warmup + self.args.steps)
        if error:
            row.status = error
            return
        row.status = "ok"
        result = trainer_throughput(run_dir, self.args.warmup, row.batch_size)
        row.images_per_s, row.data_wait_frac = result["images_per_s"], result["data_wait_frac"]
        bare_ids = self.image_ids.get((row.model, row.precision, row.batch_size))
        if bare_ids is not None:
            row.detail["same_batches_as_bare"] = same_batches(bare_ids, trainer_image_ids(run_dir))

    def run_nan_check(self, row: Row) -> None:
        row.batch_size, step = self.args.batch_size, self.args.nan_step
        max_steps = step + 3
        run_dir, error = self.train_child(row, ["--debug-nan-at-step", str(step), "--log-every", "1"], max_steps)
        if error:
            row.status = error
            return
        skipped = [e["global_step"] for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "bad_step"]
        report = json.loads((run_dir / "report.json").read_text())
        scaler_skips = report["global_step"] - report["updates"] - len(skipped)
        row.detail = {"reported_skipped_steps": skipped, "global_step": report["global_step"],
                      "updates": report["updates"], "scaler_skipped_steps": scaler_skips}
        if skipped == [step] and report["global_step"] == max_steps:
            scaler = f"{scaler_skips} step(s) skipped by the fp16 gradient scaler; " if row.precision == "fp16" else ""
            row.status = f"ok: step {step} reported skipped; {scaler}{report['updates']} updates in {max_steps} steps"
        else:
            row.status = f"FAILED: skipped steps reported {skipped}, expected [{step}]; report {report}"

    # -- the largest batch ---------------------------------------------------------------------------------

    def largest_batch(self, row: Row) -> int | None:
        """The largest batch (doubling from --batch-size, up to the cap) whose bare steps fit in memory."""
        key = (row.model, MEMORY_CLASS[row.precision])
        if key not in self.largest:
            self.largest[key] = self.search_batch(row.model, key[1])
        found = self.largest[key]["largest"]
        return found if found and found > self.args.batch_size else None

    def search_batch(self, model: str, precision: str) -> dict[str, Any]:
        from distdet.training.config import parse_config

        tried: list[list[Any]] = []
        largest, batch = self.args.batch_size, self.args.batch_size * 2
        probe = Row(model, precision, "max", "bare")
        while batch <= self.args.max_batch_cap:
            probe.batch_size = batch
            needed = self.estimate(probe, batch) * 3 / (self.args.warmup + self.args.steps)  # 3 steps
            if needed > self.left():
                tried.append([batch, "not tried: budget"])
                break
            cfg = parse_config(self.train_flags(model, precision, batch))
            try:
                result = bare_run(cfg, self.device, precision, 2, 1, self.deadline)
            except torch.cuda.OutOfMemoryError:
                tried.append([batch, "CUDA out of memory"])
                break
            finally:
                free_cuda_cache()
            if result["cut"]:
                tried.append([batch, "cut at the budget"])
                break
            tried.append([batch, f"fits ({fmt(result.get('peak_mem_mib'), '.0f')} MiB)"])
            largest, batch = batch, batch * 2
        print(f"-- largest batch for {model} {precision}: {largest} (tried {tried})", flush=True)
        return {"largest": largest, "tried": tried, "cap": self.args.max_batch_cap}

    # -- results -------------------------------------------------------------------------------------------

    def ratios(self) -> list[dict[str, Any]]:
        ok = {(r.model, r.precision, r.batch_size, r.loop): r for r in self.rows if r.status == "ok"}
        out = []
        for (model, precision, batch, loop), row in ok.items():
            fp32 = ok.get((model, "fp32", batch, loop))
            if precision != "fp32" and fp32:
                out.append({"ratio": f"{precision} / fp32", "model": model, "batch": batch, "of": loop,
                            "value": row.images_per_s / fp32.images_per_s})
            bare = ok.get((model, precision, batch, "bare"))
            if loop == "trainer" and bare:
                out.append({"ratio": "trainer / bare", "model": model, "batch": batch, "of": precision,
                            "value": row.images_per_s / bare.images_per_s,
                            "same_batches": row.detail.get("same_batches_as_bare")})
        return out

    def report(self) -> dict[str, Any]:
        return {"device": device_info(self.device), "args": {k: v for k, v in vars(self.args).items()
                                                             if k not in ("worker_trainer", "train_flags")},
                "rows": [asdict(r) for r in self.rows], "ratios": self.ratios(),
                "largest_batch": {f"{m} {p}": v for (m, p), v in self.largest.items()},
                "skipped": [r.name for r in self.rows if r.status.startswith("skipped")],
                "budget_s": self.args.budget_s, "budget_left_s": self.left()}

    def write_json(self) -> None:
        path = Path(self.args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.report(), indent=1))
        os.replace(tmp, path)

    def print_table(self) -> None:
        info = device_info(self.device)
        print(f"\nGPU check on {info['name']} (torch {info['torch']}, CUDA {info['cuda']}); "
              f"{comma_text(self.args.min_size)}/{self.args.max_size} px, {self.args.warmup} warmup + {self.args.steps} steps, "
              f"{self.args.workers} workers, data {self.args.data_dir or 'synthetic default'}")
        print(f"{'model':38s} {'prec':5s} {'batch':>5s} {'loop':9s} {'img/s':>8s} {'data wait':>9s} "
              f"{'peak MiB':>9s} {'time s':>7s}  status")
        for r in self.rows:
            wait = fmt(None if r.data_wait_frac is None else 100 * r.data_wait_frac, ".1f", "%")
            print(f"{r.model:38s} {r.precision:5s} {str(r.batch_size or r.batch):>5s} {r.loop:9s} "
                  f"{fmt(r.images_per_s, '.2f'):>8s} {wait:>9s} {fmt(r.peak_mem_mib, '.0f'):>9s} "
                  f"{fmt(r.wall_s, '.1f'):>7s}  {r.status}")
        for ratio in self.ratios():
            same = "" if ratio.get("same_batches") is None else f" (identical batches: {ratio['same_batches']})"
            print(f"ratio {ratio['ratio']:15s} {ratio['model']:38s} batch {ratio['batch']:>3} {ratio['of']:8s} "
                  f"{ratio['value']:.3f}{same}")
        skipped = [r.name for r in self.rows if r.status.startswith("skipped")]
        print(f"skipped for the budget ({len(skipped)}): {'; '.join(skipped) or 'none'}")


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def free_cuda_cache() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the trainer child needs the memory this process cached


def device_info(device: torch.device) -> dict[str, Any]:
    cuda = device.type == "cuda"
    return {"name": torch.cuda.get_device_name(device) if cuda else "CPU", "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
            "cpu_count": os.cpu_count()}


def trainer_worker(out: str, flags: list[str]) -> int:
    """The trainer child: ``train.py``'s main, then its peak GPU memory into ``out``."""
    from distdet.commands.train import main as train_main

    status = train_main(flags)
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    Path(out).write_text(json.dumps({"exit": status, "peak_mem_mib": peak}))
    return status


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker_trainer:
        return trainer_worker(args.worker_trainer, args.train_flags)
    with tempfile.TemporaryDirectory(prefix="distdet-gpu-check-") as tmp:
        check = GpuCheck(args, Path(tmp))
        check.run()
        check.write_json()
        check.print_table()
    failed = [r.name for r in check.rows if r.status.startswith(("failed", "FAILED"))]
    print(f"results: {args.json}" + (f"; FAILED rows: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
