"""Benchmark the dataset layer on the real Face Mask Detection data.

1. Annotation indexing, side by side in one run: distdet's ``build_index`` (every XML parsed
   once per run, with every validation), a bare lxml pass over the same files (the floor), and
   the original tutorial's way (BeautifulSoup with ``html.parser`` on every item, so every
   epoch re-parses all XMLs).
2. Dataset throughput: images/s through ``DetectionDataset`` + ``DataLoader`` (PNG decode,
   RGB conversion, transforms, float conversion) with 0, 1 and 2 worker processes.

Prints markdown tables. Usage::

    python benchmarks/data_pipeline.py [--data-dir DIR] [--epochs 3] [--workers 0,1,2]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from bs4 import BeautifulSoup
from lxml import etree

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distdet.classes import CLASS_NAMES  # noqa: E402
from distdet.data import DetectionDataset, build_index, collate_detection, get_transforms  # noqa: E402
from timing import median_time  # noqa: E402  (benchmarks/timing.py)


def default_data_dir() -> Path:
    if "DISTDET_FACEMASK_DIR" in os.environ:
        return Path(os.environ["DISTDET_FACEMASK_DIR"])
    for parent in Path(__file__).resolve().parents:
        if (parent / "shared" / "facemask" / "annotations").is_dir():
            return parent / "shared" / "facemask"
    return Path(__file__).resolve().parents[1].parent / "shared" / "facemask"


def tutorial_targets(xml_paths: list[Path]) -> int:
    """One epoch of the tutorial's annotation handling: parse each XML with html.parser per item."""
    label_of = {name: i + 1 for i, name in enumerate(CLASS_NAMES)}
    total = 0
    for path in xml_paths:
        with open(path) as f:
            soup = BeautifulSoup(f.read(), "html.parser")
        boxes, labels = [], []
        for obj in soup.find_all("object"):
            boxes.append([int(obj.find(tag).text) for tag in ("xmin", "ymin", "xmax", "ymax")])
            labels.append(label_of[obj.find("name").text])
        target = {"boxes": torch.as_tensor(boxes, dtype=torch.float32), "labels": torch.as_tensor(labels, dtype=torch.int64)}
        total += len(target["labels"])
    return total


def plain_lxml(xml_paths: list[Path]) -> int:
    """A bare lxml pass: parse every file and count objects, no validation."""
    parser = etree.XMLParser(resolve_entities=False, no_network=True)
    return sum(len(etree.parse(str(p), parser).getroot().findall("object")) for p in xml_paths)



def index_table(data_dir: Path, epochs: int, repeats: int) -> str:
    xml_paths = sorted((data_dir / "annotations").glob("*.xml"))
    t_index, index = median_time(lambda: build_index(data_dir), repeats)
    t_lxml, n_lxml = median_time(lambda: plain_lxml(xml_paths), repeats)
    t_tut, n_tut = median_time(lambda: tutorial_targets(xml_paths), max(1, repeats // 2))
    assert index.num_objects == n_lxml == n_tut, (index.num_objects, n_lxml, n_tut)
    rows = [
        ("distdet build_index (parse + validate + image headers)", t_index, t_index),
        ("bare lxml pass (no validation, for reference)", t_lxml, t_lxml),
        ("tutorial: BeautifulSoup html.parser per item", t_tut, t_tut * epochs),
    ]
    lines = [
        f"Annotation indexing: {len(xml_paths)} XML files, {index.num_objects} objects, median of {repeats} runs",
        "",
        f"| method | per epoch (s) | {epochs} epochs (s) | vs distdet ({epochs} epochs) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, per_epoch, total in rows:
        once = " (once per run)" if total == per_epoch else ""
        lines.append(f"| {name} | {per_epoch:.3f}{once} | {total:.3f} | {total / t_index:.1f}x |")
    return "\n".join(lines)


def throughput_table(data_dir: Path, workers: list[int], num_images: int, batch_size: int, preset: str) -> str:
    records = build_index(data_dir).records[:num_images]
    dataset = DetectionDataset(records, get_transforms(preset, train=True))
    lines = [
        f"Dataset throughput: {len(records)} real PNGs, preset {preset!r}, batch {batch_size}, "
        f"torch threads {torch.get_num_threads()}, CPU cores {os.cpu_count()}",
        "",
        "| workers | first batch (s) | steady images/s | overall images/s |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for w in workers:
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=w,
                                             collate_fn=collate_detection, shuffle=False)
        start = time.perf_counter()
        seen, first, first_seen = 0, None, 0
        for images, _ in loader:
            seen += len(images)
            if first is None:
                first = time.perf_counter()
                first_seen = seen
        end = time.perf_counter()
        steady = (seen - first_seen) / (end - first)
        lines.append(f"| {w} | {first - start:.2f} | {steady:.0f} | {seen / (end - start):.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=default_data_dir(), help="Kaggle-layout dataset (default: ../shared/facemask)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs over which the tutorial re-parses every XML (default 3)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per indexing method; the median is shown (default 5)")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts (default 0,1,2)")
    parser.add_argument("--num-images", type=int, default=853, help="images per throughput pass (default: all 853)")
    parser.add_argument("--batch-size", type=int, default=4, help="DataLoader batch size (default 4)")
    parser.add_argument("--preset", default="hflip", help="training transform preset (default hflip)")
    args = parser.parse_args()
    print(index_table(args.data_dir, args.epochs, args.repeats))
    print()
    print(throughput_table(args.data_dir, [int(w) for w in args.workers.split(",")], args.num_images, args.batch_size, args.preset))


if __name__ == "__main__":
    main()
