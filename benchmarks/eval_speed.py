"""Time the metric computation for the 170-image tutorial test split from given detections.

Side by side in one run, on the same seeded, model-like detections:

- distdet ``compute_metrics`` (COCO via pycocotools + VOC AP + confusion matrix, everything
  that ends up in metrics.json), and its VOC AP part alone;
- raw pycocotools (COCO objects from dicts, ``loadRes``, evaluate/accumulate/summarize);
- torchmetrics ``MeanAveragePrecision`` (update + compute; its default pycocotools backend).

Then the gather overhead of the evaluator with 2 gloo processes (``accelerate launch``): each
rank holds half of the per-image predictions; timed are ``gather_object`` + de-duplication and
the broadcast of the metrics dict.

Usage: ``python benchmarks/eval_speed.py [--data-dir DIR] [--dets-per-image 30 100] [--repeats 3]``
(the real data is $DISTDET_FACEMASK_DIR or shared/facemask beside the checkout or a folder above it; without it the
synthetic default dataset is used and the table says so).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from distdet.classes import CLASS_NAMES  # noqa: E402
from distdet.data import build_index, make_split, select_records  # noqa: E402
from distdet.data.records import ImageRecord  # noqa: E402
from timing import median_time  # noqa: E402  (benchmarks/timing.py)


def load_test_split(data_dir: Path | None) -> tuple[list[ImageRecord], str]:
    if data_dir is None:
        env = os.environ.get("DISTDET_FACEMASK_DIR")
        candidates = [Path(env)] if env else [p / "shared" / "facemask" for p in REPO_ROOT.parents]
        data_dir = next((c for c in candidates if (c / "annotations").is_dir()), None)
    if data_dir is None:
        from distdet.data.synthetic import default_data_dir

        data_dir = default_data_dir()
    records = build_index(data_dir).records
    split = make_split(records, "tutorial")
    return select_records(records, split.test), str(data_dir)


def simulate_detections(records: list[ImageRecord], dets_per_image: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Model-like detections: most objects found 1-3 times with jittered boxes and high scores
    (10% with a wrong class), the rest of the budget low-score boxes elsewhere; capped at
    ``dets_per_image`` per image, highest scores kept, as a detector's top-k does."""
    rng = np.random.default_rng(seed)
    out = []
    for rec in records:
        boxes, scores, labels = [], [], []
        for box, label in zip(rec.boxes, rec.labels):
            if rng.random() < 0.1:
                continue  # missed object
            size = np.array([box[2] - box[0], box[3] - box[1]] * 2)
            for k in range(int(rng.integers(1, 4))):
                boxes.append(box + rng.normal(0, 0.06 + 0.1 * k, 4) * size)
                labels.append(label if rng.random() < 0.9 else int(rng.integers(1, len(CLASS_NAMES) + 1)))
                scores.append(float(rng.beta(5, 1.5)) * (0.6 ** k))
        while len(scores) < dets_per_image:
            xy = rng.uniform(0, [rec.width * 0.9, rec.height * 0.9])
            boxes.append(np.concatenate([xy, xy + rng.uniform(6, 60, 2)]))
            labels.append(int(rng.integers(1, len(CLASS_NAMES) + 1)))
            scores.append(float(rng.beta(1, 12)))
        b = np.clip(np.asarray(boxes, dtype=np.float32).reshape(-1, 4), 0, [rec.width, rec.height] * 2)
        b[:, 2:] = np.maximum(b[:, 2:], b[:, :2] + 1)
        order = np.argsort(-np.asarray(scores), kind="stable")[:dets_per_image]
        out.append({"boxes": b[order], "scores": np.asarray(scores, dtype=np.float32)[order],
                    "labels": np.asarray(labels, dtype=np.int64)[order]})
    return out



def run_distdet(records, preds):
    from distdet.eval import compute_metrics

    m = compute_metrics(records, preds, CLASS_NAMES)
    return m["coco/AP"], m["coco/AP50"]


def run_distdet_voc(records, preds):
    from distdet.eval.inputs import normalize_predictions
    from distdet.eval.voc import class_ap, mean_ap, voc_curves

    norm = normalize_predictions(records, preds, len(CLASS_NAMES))
    return mean_ap([class_ap(c) for c in voc_curves(records, norm, CLASS_NAMES)])


def run_pycocotools(records, preds):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = {"images": [], "annotations": [], "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASS_NAMES)]}
    for i, r in enumerate(records):
        gt["images"].append({"id": i, "width": r.width, "height": r.height})
        for b, label in zip(r.boxes.tolist(), r.labels.tolist()):
            w, h = b[2] - b[0], b[3] - b[1]
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i, "category_id": label,
                                      "bbox": [b[0], b[1], w, h], "area": w * h, "iscrowd": 0})
    results = [{"image_id": i, "category_id": label, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": s}
               for i, p in enumerate(preds)
               for b, s, label in zip(p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist())]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[0], ev.stats[1]


def run_torchmetrics(records, preds):
    import torch
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox")
    metric.update([{"boxes": torch.from_numpy(p["boxes"]), "scores": torch.from_numpy(p["scores"]),
                    "labels": torch.from_numpy(p["labels"])} for p in preds],
                  [{"boxes": torch.from_numpy(r.boxes), "labels": torch.from_numpy(r.labels)} for r in records])
    with contextlib.redirect_stdout(io.StringIO()):
        result = metric.compute()
    return float(result["map"]), float(result["map_50"])


GATHER_WORKER = """
import json, statistics, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
sys.path.insert(0, sys.argv[1] + "/benchmarks")
from eval_speed import load_test_split, simulate_detections
from distdet.classes import CLASS_NAMES
from distdet.eval import compute_metrics
acc = Accelerator(cpu=True)
assert acc.num_processes == 2, acc.num_processes
records, _ = load_test_split(None if sys.argv[2] == "-" else __import__("pathlib").Path(sys.argv[2]))
preds = simulate_detections(records, int(sys.argv[3]), seed=0)
metrics = compute_metrics(records, preds, CLASS_NAMES)
local = [(i, preds[i]) for i in range(acc.process_index, len(preds), acc.num_processes)]
gather_t, bcast_t = [], []
for _ in range(int(sys.argv[4])):
    acc.wait_for_everyone()
    t = time.perf_counter()
    got = gather_object(local)
    by_index = {}
    for i, p in got:
        by_index.setdefault(i, p)
    ordered = [by_index[i] for i in range(len(preds))]
    gather_t.append(time.perf_counter() - t)
    acc.wait_for_everyone()
    t = time.perf_counter()
    same = broadcast_object_list([metrics if acc.is_main_process else None])[0]
    bcast_t.append(time.perf_counter() - t)
assert len(ordered) == len(records) and same == metrics
if acc.is_main_process:
    print("GATHER " + json.dumps({"gather": statistics.median(gather_t), "broadcast": statistics.median(bcast_t)}))
"""


def gather_overhead(data_dir: Path | None, dets_per_image: int, repeats: int) -> dict[str, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    accelerate = Path(sys.executable).with_name("accelerate")
    worker = REPO_ROOT / "benchmarks" / ".gather_worker.py"
    worker.write_text(GATHER_WORKER)
    try:
        result = subprocess.run(
            [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
             "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), str(worker),
             str(REPO_ROOT), str(data_dir) if data_dir else "-", str(dets_per_image), str(repeats)],
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"},
            capture_output=True, text=True, timeout=600,
        )
    finally:
        worker.unlink(missing_ok=True)
    line = next((l for l in result.stdout.splitlines() if l.startswith("GATHER ")), None)
    if result.returncode != 0 or line is None:
        raise RuntimeError(f"gather benchmark failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return json.loads(line[len("GATHER "):])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--dets-per-image", type=int, nargs="+", default=[30, 100])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-gather", action="store_true")
    args = parser.parse_args()

    records, source = load_test_split(args.data_dir)
    print(f"data: {source}; tutorial test split: {len(records)} images, {sum(r.num_objects for r in records)} objects")
    print(f"median of {args.repeats} runs; seconds; ratio = time / distdet compute_metrics\n")
    header = f"{'detections/image':>16}  {'total dets':>10}  {'method':<34} {'seconds':>8}  {'ratio':>6}  {'AP':>7}  {'AP50':>7}"
    print(header)
    print("-" * len(header))
    for k in args.dets_per_image:
        preds = simulate_detections(records, k, seed=0)
        total = sum(len(p["scores"]) for p in preds)
        rows = [
            ("distdet compute_metrics (all)", lambda: run_distdet(records, preds)),
            ("distdet VOC AP50 only", lambda: (float("nan"), run_distdet_voc(records, preds))),
            ("pycocotools (raw)", lambda: run_pycocotools(records, preds)),
            ("torchmetrics MeanAveragePrecision", lambda: run_torchmetrics(records, preds)),
        ]
        base = None
        for name, fn in rows:
            seconds, (ap, ap50) = median_time(fn, args.repeats)
            base = base or seconds
            print(f"{k:>16}  {total:>10}  {name:<34} {seconds:>8.3f}  {seconds / base:>6.2f}  {ap:>7.4f}  {ap50:>7.4f}")
    print("\n(VOC AP50 row: AP50 column is the VOC all-point mAP, a different protocol from COCO AP50.)")
    if not args.skip_gather:
        for k in args.dets_per_image:
            g = gather_overhead(args.data_dir, k, max(args.repeats, 5))
            print(f"gather with 2 gloo processes, {k} detections/image: gather_object + de-dup "
                  f"{g['gather'] * 1000:.1f} ms, broadcast of metrics {g['broadcast'] * 1000:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
