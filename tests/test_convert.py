"""VOC <-> COCO conversion: the converted dataset indexes, trains and evaluates as the original."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support.data import facemask_dir, needs_facemask
from support.trainer import FAST, REPO, assert_same_weights, check_ok, child_env, load_weights, make_tiny_dataset, \
    run, train_command

from distdet.data import DataIndex, open_index, save_manifest
from distdet.data.convert import write_coco, write_voc
from distdet.data.splits import Split


def assert_same_index(a: DataIndex, b: DataIndex) -> None:
    """Same class list, and the same images (stems, sizes, pixels' file contents), boxes, labels, flags, in order."""
    assert a.class_names == b.class_names
    assert [r.stem for r in a.records] == [r.stem for r in b.records]
    for ra, rb in zip(a.records, b.records):
        assert (ra.width, ra.height) == (rb.width, rb.height), ra.stem
        assert np.array_equal(ra.boxes, rb.boxes) and ra.boxes.dtype == rb.boxes.dtype, ra.stem
        assert np.array_equal(ra.labels, rb.labels), ra.stem
        assert np.array_equal(ra.difficult, rb.difficult) and np.array_equal(ra.crowd, rb.crowd), ra.stem
        assert ra.image_path.read_bytes() == rb.image_path.read_bytes(), ra.stem


def distdet(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distdet", *args], capture_output=True, text=True, timeout=300,
                          env=child_env(), cwd=REPO)


def convert(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """``distdet convert ARGS`` in this process: exit status, stdout, stderr."""
    from distdet.cli import main

    code = main(["convert", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_convert_command_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = make_tiny_dataset(tmp_path)
    code, out, _ = convert(capsys, "--to", "coco", str(source), str(tmp_path / "coco"))
    assert code == 0 and "wrote 11 images" in out and "(coco)" in out
    coco = json.loads((tmp_path / "coco" / "annotations.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["with_mask", "without_mask", "mask_weared_incorrect"]
    assert convert(capsys, "--to", "voc", str(tmp_path / "coco"), str(tmp_path / "voc"))[0] == 0
    original = open_index(source)
    assert_same_index(original, open_index(tmp_path / "coco"))
    assert_same_index(original, open_index(tmp_path / "voc"))
    # a non-empty destination is refused (exit 2), a broken source is an error naming the file (exit 1)
    code, _, err = convert(capsys, "--to", "voc", str(tmp_path / "coco"), str(tmp_path / "voc"))
    assert code == 2 and "is not an empty folder" in err
    (tmp_path / "coco" / "annotations.json").write_text("[]")
    code, _, err = convert(capsys, "--to", "voc", str(tmp_path / "coco"), str(tmp_path / "voc2"))
    assert code == 1 and f"{tmp_path / 'coco' / 'annotations.json'}: expected a JSON object" in err


@needs_facemask
def test_real_data_to_coco_and_back_gives_the_same_index(tmp_path: Path) -> None:
    original = open_index(facemask_dir())
    coco = write_coco(original, tmp_path / "coco", link=True)
    voc, crowd = write_voc(open_index(coco), tmp_path / "voc", link=True)
    assert crowd == 0 and len(original.records) == 853
    assert_same_index(original, open_index(coco))
    assert_same_index(original, open_index(voc))


def _subset_manifest(index: DataIndex, path: Path) -> Path:
    """A small split of the real data (cheap to train and evaluate on)."""
    stems = [r.stem for r in index.records]
    return save_manifest(path, Split("subset", train=stems[:6], val=[], test=stems[6:10]))


@needs_facemask
@pytest.mark.slow
def test_real_data_trains_and_evaluates_identically_in_both_formats(tmp_path: Path) -> None:
    original = open_index(facemask_dir())
    coco = write_coco(original, tmp_path / "coco", link=True)
    manifest = _subset_manifest(original, tmp_path / "subset.json")
    runs = {}
    for name, data in (("voc", facemask_dir()), ("coco", coco)):
        runs[name] = tmp_path / f"run-{name}"
        check_ok(run(train_command([*FAST, "--data-dir", str(data), "--split-manifest", str(manifest),
                                    "--output-dir", str(runs[name]), "--epochs", "1", "--max-steps", "2",
                                    "--deterministic", "--seed", "3"])))
    assert_same_weights(load_weights(runs["voc"]), load_weights(runs["coco"]))
    card = json.loads((runs["coco"] / "model_card.json").read_text())
    assert card["info"]["annotations"] == str(coco / "annotations.json") and card["info"]["category_ids"] == [1, 2, 3]

    metrics = {}
    for name, data in (("voc", facemask_dir()), ("coco", coco)):
        out = tmp_path / f"eval-{name}"
        done = distdet("evaluate", "--model-dir", str(runs["voc"]), "--data-dir", str(data),
                       "--split-manifest", str(manifest), "--output-dir", str(out), "--num-rendered", "1")
        assert done.returncode == 0, done.stderr
        metrics[name] = json.loads((out / "metrics.json").read_text())
    assert metrics["voc"] == metrics["coco"] and metrics["voc"]["counts"]["images"] == 4
