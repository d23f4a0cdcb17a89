"""notebooks/colab_quickstart.ipynb executed headless by a real Jupyter kernel, on CPU, tiny settings.

Every cell must run (nbclient raises on the first failing cell), including the
``notebook_launcher`` cell with 2 real CPU processes, and the run folder must hold what each
step promises: the model card, metrics, results.csv, the pictures and the rendered predictions.
"""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support.trainer import REPO, free_port

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = REPO / "notebooks" / "colab_quickstart.ipynb"
SMALL = {
    "DISTDET_NB_INSTALL": "0",
    "DISTDET_NB_DATA": "synthetic",
    "DISTDET_NB_SYNTHETIC_IMAGES": "10",
    "DISTDET_NB_SYNTHETIC_SIZE": "96x72",
    "DISTDET_NB_MODEL": "fasterrcnn_mobilenet_v3_large_320_fpn",
    "DISTDET_NB_EPOCHS": "1",
    "DISTDET_NB_PROCESSES": "2",
    "DISTDET_NB_PREDICTED": "2",
    "DISTDET_NB_EXTRA_FLAGS": "--weights none --min-size 64 --max-size 96 --batch-size 2 --split-scheme stratified "
                              "--test-fraction 0.2 --workers 0 --no-progress --log-every 1 --no-tensorboard",
}


def _png_outputs(cell) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(out["data"]["image/png"])))
            for out in cell.get("outputs", []) if "image/png" in out.get("data", {})]


@pytest.mark.slow
def test_every_cell_runs_and_leaves_its_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SMALL.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DISTDET_NB_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the kernel imports this checkout's distdet
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("DISTDET_NB_PORT", str(free_port()))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()

    run = tmp_path / "runs" / "quickstart"
    card = json.loads((run / "model_card.json").read_text())
    assert card["model"] == "fasterrcnn_mobilenet_v3_large_320_fpn"
    assert card["info"]["epoch"] == 2  # trained 1 epoch, then resumed for a second
    events = [json.loads(line)["event"] for line in (run / "events.jsonl").read_text().splitlines()]
    assert events.count("started") == 1 and events.count("resumed") == 1
    metrics = json.loads((run / "evaluation" / "metrics.json").read_text())
    assert 0.0 <= metrics["voc/mAP50"] <= 1.0
    assert (run / "results.csv").read_text().splitlines()[0].startswith("epoch,step,train/loss")
    assert (run / "model.ts").stat().st_size > 1_000_000
    multi = json.loads((tmp_path / "runs" / "multi" / "config.json").read_text())
    assert multi["resolved"]["world_size"] == 2  # notebook_launcher started a real 2-rank group
    assert (tmp_path / "runs" / "multi" / "model_card.json").is_file()

    shown = [image for cell in notebook.cells for image in _png_outputs(cell)]
    # labels.png twice (check-data, training), train_batches, confusion matrix, PR curves, 2 predictions
    assert len(shown) == 7
    for image in shown:
        assert np.asarray(image.convert("L"), dtype=np.float64).std() > 10
    renders = sorted((run / "predictions").glob("*.png"))
    assert len(renders) == 2
