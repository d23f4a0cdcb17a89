"""RoIAlign forward and backward on CPU with 1 and 2 torch threads, at the recipe's sizes.

A py-spy profile of the real CPU recipe (benchmarks/RESULTS.md, issue 17) put a fifth of the
step in torchvision's RoIAlign backward. This times that op alone, as the box head calls it
(``MultiScaleRoIAlign``: 4 images x 512 sampled proposals, 128 FPN channels, 7x7 output,
sampling ratio 2), on feature maps of a 448x672 input (strides 4-32), to show whether a
second thread helps it (if not, 2 processes x 1 thread use the cores better than 1 x 2).

    PYTHONPATH=. python benchmarks/roi_align_threads.py --repeats 5
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import OrderedDict

import torch
from torchvision.ops import MultiScaleRoIAlign


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--proposals", type=int, default=512, help="sampled proposals per image (box batch)")
    p.add_argument("--channels", type=int, default=128, help="FPN channels (the Lite0 FPN has 128)")
    p.add_argument("--size", type=int, nargs=2, default=(448, 672), metavar=("H", "W"))
    p.add_argument("--repeats", type=int, default=5)
    return p.parse_args(argv)


def inputs(args: argparse.Namespace) -> tuple[OrderedDict, list[torch.Tensor], list[tuple[int, int]]]:
    gen = torch.Generator().manual_seed(0)
    h, w = args.size
    features = OrderedDict((str(i), torch.randn(args.images, args.channels, h // s, w // s, generator=gen,
                                                requires_grad=True))
                           for i, s in enumerate((4, 8, 16, 32)))
    boxes = []
    for _ in range(args.images):
        xy = torch.rand(args.proposals, 2, generator=gen) * torch.tensor([w * 0.8, h * 0.8])
        wh = 8 + torch.rand(args.proposals, 2, generator=gen) * torch.tensor([w * 0.3, h * 0.3])
        boxes.append(torch.cat([xy, xy + wh], dim=1))
    return features, boxes, [(h, w)] * args.images


def time_op(args: argparse.Namespace, threads: int) -> tuple[float, float]:
    torch.set_num_threads(threads)
    pool = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
    features, boxes, sizes = inputs(args)
    forward, backward = [], []
    for _ in range(args.repeats + 1):  # the first run warms up
        start = time.perf_counter()
        out = pool(features, boxes, sizes)
        mid = time.perf_counter()
        out.sum().backward()
        end = time.perf_counter()
        forward.append(mid - start)
        backward.append(end - mid)
    return statistics.median(forward[1:]), statistics.median(backward[1:])


def main(argv: list[str] | None = None) -> int:
    import os

    args = parse_args(argv)
    rows = {threads: time_op(args, threads) for threads in (1, 2)}
    print(f"RoIAlign, {args.images} images x {args.proposals} proposals, {args.channels} channels, input "
          f"{args.size[0]}x{args.size[1]}, median of {args.repeats}; load average {os.getloadavg()[0]:.2f}")
    print("| torch threads | forward (s) | backward (s) |\n|---:|---:|---:|")
    for threads, (fwd, bwd) in rows.items():
        print(f"| {threads} | {fwd:.3f} | {bwd:.3f} |")
    print(f"backward, 1 thread / 2 threads: {rows[1][1] / rows[2][1]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
