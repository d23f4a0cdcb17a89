"""Time one training step (forward + backward + SGD step) of fasterrcnn_lite0_fpn on CPU.

Uses two real face-mask images (maksssksksss0/230, 512x366) with their boxes, so the
number of ground-truth boxes is realistic. Prints the median of N timed steps after a
warm-up step, for each requested min_size. Run:

    PYTHONPATH=$PWD python benchmarks/lite0_step_time.py --min-sizes 320 512 --steps 5 [--bf16]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from distdet.modeling.backbones.lite0 import fasterrcnn_lite0_fpn
from distdet.classes import label_of

STEMS = ("maksssksksss0", "maksssksksss230")


def _data_dir() -> Path:
    env = os.environ.get("DISTDET_FACEMASK_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "facemask"
    if not (path / "images").is_dir():
        raise SystemExit(f"face-mask dataset not found at {path}; set DISTDET_FACEMASK_DIR")
    return path


def _load(stem: str, data_dir: Path) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    image = np.asarray(Image.open(data_dir / "images" / f"{stem}.png").convert("RGB"))
    root = ET.parse(data_dir / "annotations" / f"{stem}.xml").getroot()
    boxes, labels = [], []
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        boxes.append([float(bb.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")])
        labels.append(label_of(obj.find("name").text))
    tensor = torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 255
    return tensor, {"boxes": torch.tensor(boxes), "labels": torch.tensor(labels)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-sizes", type=int, nargs="+", default=[320, 512])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fpn-out-channels", type=int, default=128)
    parser.add_argument("--trainable-backbone-layers", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="autocast the forward to bfloat16 (CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    samples = [_load(s, _data_dir()) for s in STEMS]
    images = [s[0] for s in samples]
    targets = [s[1] for s in samples]
    print(f"images: {[tuple(i.shape) for i in images]}, boxes: {[len(t['boxes']) for t in targets]}, "
          f"threads: {torch.get_num_threads()}")
    for min_size in args.min_sizes:
        model = fasterrcnn_lite0_fpn(
            num_classes=4, min_size=min_size, max_size=min_size * 5 // 3,
            fpn_out_channels=args.fpn_out_channels,
            trainable_backbone_layers=args.trainable_backbone_layers,
        ).train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
        times = []
        for step in range(args.steps + 1):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                losses = model(images, targets)
            loss = sum(losses.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step:  # step 0 is warm-up
                times.append(time.perf_counter() - start)
        print(f"min_size {min_size} (max {min_size * 5 // 3}), fpn {args.fpn_out_channels}, "
              f"{'bf16' if args.bf16 else 'fp32'}, "
              f"trainable {args.trainable_backbone_layers}: median {statistics.median(times):.2f} s/step "
              f"(min {min(times):.2f}, max {max(times):.2f}, {args.steps} steps), loss {loss.item():.3f}")


if __name__ == "__main__":
    main()
