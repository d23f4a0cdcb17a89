"""The synthetic embedded default: reproducible files, valid VOC annotations, safe caching."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from lxml import etree
from PIL import Image

from distdet.classes import CLASS_NAMES
from distdet.commands import make_synthetic as make_synthetic_command
from distdet.data import DetectionDataset, build_index
from distdet.data.check import check_data
from distdet.data.synthetic import (
    MARKER_NAME,
    SYNTHETIC_VERSION,
    default_data_dir,
    make_synthetic_dataset,
    read_marker,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL = {"image_size": (160, 120), "face_size": (20, 50)}


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _read_objects(xml_path: Path) -> tuple[tuple[int, int, int], list[tuple[str, list[int]]]]:
    root = etree.parse(str(xml_path)).getroot()
    assert root.tag == "annotation"
    assert root.findtext("folder") == "images"
    assert root.findtext("filename") == xml_path.stem + ".png"
    assert root.findtext("segmented") == "0"
    size = tuple(int(root.findtext(f"size/{tag}")) for tag in ("width", "height", "depth"))
    objects = []
    for obj in root.iter("object"):
        assert obj.findtext("pose") == "Unspecified"
        assert [obj.findtext(t) for t in ("truncated", "occluded", "difficult")] == ["0", "0", "0"]
        box = [int(obj.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax")]
        objects.append((obj.findtext("name"), box))
    return size, objects


def _child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    a = make_synthetic_dataset(tmp_path / "a", num_images=6, seed=3, **SMALL)
    b = make_synthetic_dataset(tmp_path / "b", num_images=6, seed=3, **SMALL)
    hashes = _hashes(a)
    assert len(hashes) == 2 * 6 + 1
    assert hashes == _hashes(b)


def test_image_depends_only_on_seed_and_index(tmp_path: Path) -> None:
    short = make_synthetic_dataset(tmp_path / "short", num_images=3, seed=5, **SMALL)
    long = make_synthetic_dataset(tmp_path / "long", num_images=6, seed=5, **SMALL)
    for sub in ("images", "annotations"):
        short_hashes = _hashes(short / sub)
        long_hashes = _hashes(long / sub)
        assert short_hashes == {k: long_hashes[k] for k in short_hashes}


def test_different_seeds_differ(tmp_path: Path) -> None:
    a = _hashes(make_synthetic_dataset(tmp_path / "a", num_images=4, seed=0, **SMALL) / "images")
    b = _hashes(make_synthetic_dataset(tmp_path / "b", num_images=4, seed=1, **SMALL) / "images")
    assert a.keys() == b.keys()
    assert all(a[k] != b[k] for k in a)


def test_annotations_are_valid_voc_with_all_classes(tmp_path: Path) -> None:
    num_images = 30
    out = make_synthetic_dataset(tmp_path / "voc", num_images=num_images, seed=0, image_size=(200, 150),
                                 max_objects_per_image=4, face_size=(24, 60))
    images = sorted((out / "images").iterdir())
    annotations = sorted((out / "annotations").iterdir())
    assert [p.stem for p in images] == [p.stem for p in annotations] == [f"synth_{i:04d}" for i in range(num_images)]
    counts = dict.fromkeys(CLASS_NAMES, 0)
    for image_path, xml_path in zip(images, annotations):
        with Image.open(image_path) as image:
            assert image.format == "PNG" and image.mode == "RGB"
            assert image.size == (200, 150)
        size, objects = _read_objects(xml_path)
        assert size == (200, 150, 3)
        assert 1 <= len(objects) <= 4
        for name, (x1, y1, x2, y2) in objects:
            assert name in CLASS_NAMES
            counts[name] += 1
            assert 0 <= x1 < x2 <= 200 and 0 <= y1 < y2 <= 150
            assert 24 <= y2 - y1 <= 60
        boxes = [b for _, b in objects]
        for i, a in enumerate(boxes):  # faces never overlap
            for b in boxes[i + 1:]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
    assert all(count > 0 for count in counts.values()), counts
    marker = read_marker(out)
    assert marker is not None and marker["version"] == SYNTHETIC_VERSION
    assert marker["objects_per_class"] == counts
    assert marker["params"]["num_images"] == num_images


def test_data_layer_reads_synthetic_output_without_problems(tmp_path: Path) -> None:
    out = make_synthetic_dataset(tmp_path / "idx", num_images=8, seed=4, **SMALL)
    marker = read_marker(out)
    index = build_index(out)
    assert index.problems == []
    assert [r.stem for r in index.records] == [f"synth_{i:04d}" for i in range(8)]
    assert sum(r.num_objects for r in index.records) == marker["num_objects"]
    for record in index.records:
        _, objects = _read_objects(record.annotation_path)
        np.testing.assert_array_equal(record.boxes, np.array([b for _, b in objects], dtype=np.float32))
        assert [CLASS_NAMES[label - 1] for label in record.labels] == [name for name, _ in objects]
    image, target = DetectionDataset(index.records)[0]
    assert tuple(image.shape) == (3, 120, 160)
    assert target["boxes"].shape == (index.records[0].num_objects, 4)
    report = check_data(out)
    assert report.ok and report.problems == [] and sum(report.clamped.values()) == 0
    assert report.objects_per_class == marker["objects_per_class"]


def test_faces_are_drawn_inside_their_boxes(tmp_path: Path) -> None:
    """Pixels inside a box differ from the plain background: the box marks a drawn face."""
    out = make_synthetic_dataset(tmp_path / "d", num_images=3, seed=2, **SMALL)
    for index in range(3):
        pixels = np.asarray(Image.open(out / "images" / f"synth_{index:04d}.png"))
        _, objects = _read_objects(out / "annotations" / f"synth_{index:04d}.xml")
        for _, (x1, y1, x2, y2) in objects:
            centre = pixels[(y1 + y2) // 2, x1:x2]
            assert len(np.unique(centre.reshape(-1, 3), axis=0)) >= 2  # face edge, skin or mask


def test_refuses_non_empty_folder_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty"):
        make_synthetic_dataset(out, num_images=2, **SMALL)
    assert (out / "keep.txt").exists()
    make_synthetic_dataset(out, num_images=2, overwrite=True, **SMALL)
    assert not (out / "keep.txt").exists()
    assert len(list((out / "images").iterdir())) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folders left


def test_empty_existing_folder_is_used(tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    make_synthetic_dataset(out, num_images=2, **SMALL)
    assert read_marker(out) is not None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_images": 0}, "num_images"),
        ({"seed": -1}, "seed"),
        ({"max_objects_per_image": 0}, "max_objects_per_image"),
        ({"face_size": (50, 20)}, "face_size"),
        ({"image_size": (40, 40), "face_size": (20, 50)}, "too small"),
    ],
)
def test_bad_parameters_are_named(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_synthetic_dataset(tmp_path / "x", **{"num_images": 2, **SMALL, **kwargs})
    assert not (tmp_path / "x").exists()


def _command_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distdet")
    make_synthetic_command.register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_command_writes_n_pairs_and_refuses_non_empty(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    parser = _command_parser()
    out = tmp_path / "cli"
    argv = ["make-synthetic", str(out), "--num-images", "5", "--seed", "7", "--width", "160", "--height", "120",
            "--min-face", "20", "--max-face", "50"]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    assert "wrote 5 images" in capsys.readouterr().out
    assert len(list((out / "images").glob("*.png"))) == 5
    assert len(list((out / "annotations").glob("*.xml"))) == 5
    assert read_marker(out)["params"]["seed"] == 7

    args = parser.parse_args(argv)
    assert args.func(args) == 2
    assert "not empty" in capsys.readouterr().err
    args = parser.parse_args(argv + ["--overwrite"])
    assert args.func(args) == 0


def test_command_help_explains_every_flag(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        _command_parser().parse_args(["make-synthetic", "--help"])
    text = capsys.readouterr().out
    for flag in ("--num-images", "--seed", "--width", "--height", "--max-objects", "--min-face", "--max-face",
                 "--overwrite"):
        assert flag in text
    with pytest.raises(SystemExit):
        _command_parser().parse_args(["make-synthetic", "out", "--num-images", "0"])


def test_python_m_distdet_make_synthetic(tmp_path: Path) -> None:
    out = tmp_path / "pm"
    result = subprocess.run(
        [sys.executable, "-m", "distdet", "make-synthetic", str(out), "--num-images", "3", "--width", "160",
         "--height", "120", "--min-face", "20", "--max-face", "50"],
        env=_child_env(), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert len(list((out / "images").glob("*.png"))) == 3


def test_default_data_dir_generates_once_and_reuses(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="distdet.data.synthetic")
    first = default_data_dir(num_images=4, image_size=(160, 120), cache_root=tmp_path)
    assert first.parent == tmp_path and first.name == f"synthetic-v{SYNTHETIC_VERSION}-seed0-n4-160x120"
    marker_mtime = (first / MARKER_NAME).stat().st_mtime_ns
    assert sum("generating" in r.message for r in caplog.records) == 1
    assert default_data_dir(num_images=4, image_size=(160, 120), cache_root=tmp_path) == first
    assert (first / MARKER_NAME).stat().st_mtime_ns == marker_mtime
    assert sum("generating" in r.message for r in caplog.records) == 1
    assert any(str(first) in r.message for r in caplog.records)


def test_default_data_dir_honours_distdet_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTDET_CACHE", str(tmp_path / "cache"))
    path = default_data_dir(num_images=2, image_size=(160, 120))
    assert path.parent == tmp_path / "cache"
    assert read_marker(path) is not None


def test_default_data_dir_repairs_damaged_cache(tmp_path: Path) -> None:
    path = default_data_dir(num_images=4, image_size=(160, 120), cache_root=tmp_path)
    expected = _hashes(path)
    (path / "images" / "synth_0002.png").unlink()
    stale = tmp_path / f".{path.name}.tmp-99999-deadbeef"  # left behind by a killed generator
    stale.mkdir()
    assert default_data_dir(num_images=4, image_size=(160, 120), cache_root=tmp_path) == path
    assert _hashes(path) == expected
    assert not stale.exists()


CHILD = textwrap.dedent(
    """
    import json, logging, sys, time
    from pathlib import Path
    from distdet.data.synthetic import default_data_dir
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    rank, root = int(sys.argv[1]), Path(sys.argv[2])
    (root.parent / f"ready{rank}").touch()
    while not all((root.parent / f"ready{r}").exists() for r in (0, 1)):
        time.sleep(0.01)
    print(json.dumps(str(default_data_dir(num_images=30, image_size=(160, 120), cache_root=root))))
    """
)


def test_two_processes_share_one_default_folder(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    children = [
        subprocess.Popen([sys.executable, "-c", CHILD, str(rank), str(root)], env=_child_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]
    results = [child.communicate(timeout=180) for child in children]
    assert len(results) == 2
    assert all(child.returncode == 0 for child in children), [err for _, err in results]
    paths = {json.loads(out) for out, _ in results}
    assert len(paths) == 1
    path = Path(paths.pop())
    assert sum("generating" in err for _, err in results) == 1  # the other process waited and reused
    assert sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock")) == [path.name]
    marker = read_marker(path)
    assert marker is not None and marker["params"]["num_images"] == 30
    assert len(list((path / "images").glob("*.png"))) == 30
    assert len(list((path / "annotations").glob("*.xml"))) == 30
