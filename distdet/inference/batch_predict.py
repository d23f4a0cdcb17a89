"""Predict a set of image files: rendered images, one ``predictions.json``, a line per image.

Used by ``distdet predict``. Under ``accelerate launch`` each rank predicts and renders its
share of whole batches (:func:`distdet.runtime.sharding.shard_batches`, unpadded: each image
once), so every image sits in the same batch, with the same neighbours, for any number of
processes. The results are gathered and the main process writes one merged
``predictions.json``, identical for 1 or N processes.

``predictions.json``::

    {"checkpoint": str, "model": str, "class_names": [...], "score_threshold": float,
     "images": [{"file", "width", "height", "detections": [...], "rendered"}, ...],
     "failures": [{"file", "error"}, ...]}

``images`` follows the order of the expanded inputs; each entry is what
:class:`distdet.inference.predictor.Detector` returns for that path plus the rendered file's name.
"""
from __future__ import annotations

import glob
import stat
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import gather_object
from PIL import Image
from tqdm.auto import tqdm

from distdet.data.images import IMAGE_SUFFIXES, load_rgb
from distdet.data.voc import parse_voc_annotation
from distdet.io_utils import atomic_write, atomic_write_json
from distdet.inference.predictor import Detector
from distdet.render import add_legend, draw_detections, side_by_side
from distdet.runtime.sharding import shard_batches

PREDICTIONS_NAME = "predictions.json"


@dataclass
class PredictionSummary:
    """What a prediction run produced (the same on every process after gathering)."""

    images: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    predictions_file: Path | None = None


def _entry_kind(path: Path) -> str | None:
    """None for a regular file (links followed), else what the folder entry is."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "a dangling link" if path.is_symlink() else "gone"
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    if stat.S_ISREG(mode):
        return None
    kinds = {stat.S_ISDIR: "a directory", stat.S_ISFIFO: "a FIFO", stat.S_ISSOCK: "a socket",
             stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device"}
    found = next((name for test, name in kinds.items() if test(mode)), "not a regular file")
    return f"a link to {found}" if path.is_symlink() else found


def expand_inputs(inputs: Sequence[str | Path]) -> tuple[list[Path], list[dict[str, str]], list[dict[str, str]]]:
    """Turn files, folders and glob patterns into a list of image files, in order.

    Folders contribute their regular files (links followed) with an image suffix (``.png``,
    ``.jpg``, ``.jpeg``), sorted by name, not recursing; their other regular files are ignored
    and every entry that is not a regular file (directory, FIFO, socket, device, dangling link)
    is returned in ``skipped`` ``{"file", "reason"}``. A glob contributes its matching files,
    sorted. A file named explicitly is kept whatever its suffix (reading it decides). Each file
    appears once. Inputs that name nothing become failures ``{"file", "error"}``.
    """
    paths: list[Path] = []
    failures: list[dict[str, str]] = []
    skipped: list[dict[str, str]] = []
    seen: set[Path] = set()

    def add(path: Path) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            paths.append(path)

    for item in inputs:
        text = str(item)
        path = Path(text)
        if path.is_dir():
            entries = sorted(path.iterdir())
            kinds = {p: _entry_kind(p) for p in entries}
            skipped += [{"file": str(p), "reason": f"skipped: {kind}"} for p, kind in kinds.items() if kind]
            found = [p for p in entries if kinds[p] is None and p.suffix.lower() in IMAGE_SUFFIXES]
            if not found:
                failures.append({"file": text, "error": f"folder has no image files ({', '.join(IMAGE_SUFFIXES)})"})
            for p in found:
                add(p)
        elif path.exists():
            add(path)
        elif glob.has_magic(text):
            found = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
            if not found:
                failures.append({"file": text, "error": "pattern matches no files"})
            for p in found:
                add(p)
        else:
            failures.append({"file": text, "error": "no such file or folder"})
    return paths, failures, skipped


def rendered_names(paths: Sequence[Path]) -> list[str]:
    """A distinct PNG file name per input: ``<stem>.png``, then ``<stem>_2.png`` ... on clashes."""
    names: list[str] = []
    used: set[str] = set()
    for path in paths:
        name, n = f"{path.stem}.png", 1
        while name.lower() in used:
            n += 1
            name = f"{path.stem}_{n}.png"
        used.add(name.lower())
        names.append(name)
    return names


def summary_line(result: dict[str, Any], class_names: Sequence[str]) -> str:
    """``file: 2 with_mask, 0 without_mask, 1 mask_weared_incorrect`` (every class listed)."""
    counts = Counter(d["label"] for d in result["detections"])
    return f"{result.get('file', '<image>')}: " + ", ".join(f"{counts[name]} {name}" for name in class_names)


def render_result(
    image: Image.Image,
    result: dict[str, Any],
    class_names: Sequence[str],
    ground_truth: tuple[str, Any] | None = None,
) -> Image.Image:
    """The image with its predicted boxes and a class legend; with ``ground_truth`` given as
    ``(title, VocAnnotation or None)``, the ground truth panel is placed to its left."""
    detections = result["detections"][::-1]  # the best-scoring box last, on top
    predicted = draw_detections(
        image,
        [d["box"] for d in detections],
        [d["label_id"] for d in detections],
        [d["score"] for d in detections],
        class_names,
    )
    if ground_truth is not None:
        title, annotation = ground_truth
        truth = image if annotation is None else draw_detections(image, annotation.boxes, annotation.labels,
                                                                 class_names=class_names)
        predicted = side_by_side(truth, predicted, titles=(title, "prediction"))
    return add_legend(predicted, class_names)


def _reason(exc: Exception, path: Path) -> str:
    """The error's text without a leading ``<path>: `` (the failure record names the file)."""
    text = str(exc)
    prefix = f"{path}: "
    return text[len(prefix):] if text.startswith(prefix) else text


def _ground_truth(image_path: Path, annotations_dir: Path, class_names: Sequence[str]) -> tuple[str, Any]:
    xml = annotations_dir / f"{image_path.stem}.xml"
    if not xml.is_file():
        return f"ground truth: no {xml.name}", None
    return "ground truth", parse_voc_annotation(xml, tuple(class_names))


def _load_batch(detector: Detector, paths: Sequence[Path], batch: Sequence[int],
                ) -> tuple[list[tuple[int, Image.Image]], list[tuple[int, None, dict[str, str]]]]:
    """The readable, resizable images of ``batch`` (index, image), and a failure entry for each other one."""
    loaded: list[tuple[int, Image.Image]] = []
    failed: list[tuple[int, None, dict[str, str]]] = []
    for index in batch:
        try:
            image = load_rgb(paths[index])
            detector.check_resizable(image, paths[index])
            loaded.append((index, image))
        except (ValueError, OSError) as exc:
            failed.append((index, None, {"file": str(paths[index]), "error": _reason(exc, paths[index])}))
    return loaded, failed


def _render(image: Image.Image, result: dict[str, Any], out_path: Path, annotations_dir: Path | None,
            class_names: Sequence[str]) -> dict[str, str] | None:
    """Write the rendering of ``result`` (beside its ground truth with ``annotations_dir``); return a
    failure entry when the annotation cannot be read (the prediction is still rendered), else None."""
    failure, truth = None, None
    if annotations_dir is not None:
        try:
            truth = _ground_truth(Path(result["file"]), annotations_dir, class_names)
        except (ValueError, OSError) as exc:
            failure = {"file": result["file"], "error": f"annotation: {exc}"}  # names the XML file
            truth = ("ground truth: unreadable annotation", None)
    rendered = render_result(image, result, class_names, truth)
    atomic_write(out_path, lambda tmp: rendered.save(tmp, format="PNG"))
    return failure


def predict_files(
    detector: Detector,
    paths: Sequence[Path],
    out_dir: Path,
    accelerator: Accelerator,
    *,
    annotations_dir: Path | None = None,
    input_failures: Sequence[dict[str, str]] = (),
    skipped: Sequence[dict[str, str]] = (),
    checkpoint: str = "",
    write: Callable[[str], None] = tqdm.write,
) -> PredictionSummary:
    """Predict ``paths`` (this process's shard of them), render, gather, write the JSON.

    A file that cannot be read (or whose annotation cannot be parsed) is listed in
    ``failures`` and the rest go on; ``skipped`` (folder entries that are not files) is kept
    in the summary and the JSON. ``write`` receives one summary line per image. Every
    process returns the merged summary; only the main process writes ``predictions.json``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    names = rendered_names(paths)
    mine = shard_batches(len(paths), detector.batch_size, accelerator.num_processes, accelerator.process_index,
                         pad=False)
    class_names = detector.class_names
    local: list[tuple[int, dict[str, Any] | None, dict[str, str] | None]] = []
    bar = tqdm(total=sum(map(len, mine)), desc="predict", unit="image", disable=not accelerator.is_main_process or len(paths) < 2)
    for batch in mine:
        loaded, failed = _load_batch(detector, paths, batch)
        local.extend(failed)
        bar.update(len(failed))
        for (index, image), result in zip(loaded, detector.predict_pil([image for _, image in loaded])):
            result = {"file": str(paths[index]), **result, "rendered": names[index]}
            failure = _render(image, result, out_dir / names[index], annotations_dir, class_names)
            write(summary_line(result, class_names))
            local.append((index, result, failure))
            bar.update(1)
    bar.close()

    merged = sorted(gather_object(local), key=lambda item: item[0])
    summary = PredictionSummary(
        images=[result for _, result, _ in merged if result is not None],
        failures=list(input_failures) + [failure for _, _, failure in merged if failure is not None],
        skipped=list(skipped),
    )
    if accelerator.is_main_process:
        summary.predictions_file = atomic_write_json(out_dir / PREDICTIONS_NAME, {
            "checkpoint": checkpoint,
            "model": detector.card.model,
            "class_names": list(class_names),
            "score_threshold": detector.score_threshold,
            "images": summary.images,
            "failures": summary.failures,
            "skipped": summary.skipped,
        })
    accelerator.wait_for_everyone()
    return summary
