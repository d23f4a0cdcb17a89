"""--report-to: W&B (offline) and MLflow (local file store) get the metrics.jsonl scalars and the
run config, read back from the files they write; in a real 2-process gloo run only the main
process writes them."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from support.trackers import wandb_config, wandb_history
from support.trainer import FAST, check_ok, launch_command, make_tiny_dataset, read_jsonl, run, train_command

from distdet.training.config import parse_config
from distdet.training.run_logging import mlflow_metric_name
from distdet.training.tracker_choice import resolve_trackers

pytest.importorskip("wandb")
pytest.importorskip("mlflow")


TRACKER_ENV = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "MLFLOW_TRACKING_URI": ""}


def _tracked_args(root: Path, out: Path) -> list[str]:
    return FAST + ["--data-dir", str(make_tiny_dataset(root)), "--output-dir", str(out), "--epochs", "1",
                   "--eval-every", "1", "--report-to", "all"]


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory) -> Path:
    """One process, 1 epoch with an evaluation, --report-to all."""
    root = tmp_path_factory.mktemp("trackers")
    check_ok(run(train_command(_tracked_args(root, root / "run")), **TRACKER_ENV))
    return root / "run"


def _jsonl_scalars(run_dir: Path) -> dict[tuple[str, int], dict[str, float]]:
    """``{(kind, step): {name: value}}`` of the numbers in metrics.jsonl."""
    return {(r["kind"], r["step"]): {k: v for k, v in r.items() if k not in ("kind", "step", "time", "epoch")
                                     and isinstance(v, (int, float))} for r in read_jsonl(run_dir / "metrics.jsonl")}


def test_wandb_offline_run_holds_every_logged_scalar_and_the_config(tracked_run: Path) -> None:
    runs = sorted((tracked_run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, f"one W&B run, found {runs}"
    history = {row["_step"]: row for row in wandb_history(runs[0])}
    logged = _jsonl_scalars(tracked_run)
    assert {kind for kind, _ in logged} == {"train", "test"}
    for (kind, step), values in logged.items():
        for name, value in values.items():
            assert history[step][f"{kind}/{name}"] == pytest.approx(value, rel=1e-6), (kind, step, name)
    config = wandb_config(runs[0])
    assert (config["report_to"], config["world_size"], config["epochs"]) == ("all", 1, 1)
    assert config["model"] == "fasterrcnn_mobilenet_v3_large_320_fpn"


def test_mlflow_file_store_holds_every_logged_scalar_and_the_config(tracked_run: Path) -> None:
    client, runs = _mlflow_runs(tracked_run)
    assert len(runs) == 1, "one MLflow run"
    mlflow_run = runs[0]
    for (kind, step), values in _jsonl_scalars(tracked_run).items():
        for name, value in values.items():
            history = {m.step: m.value for m in client.get_metric_history(mlflow_run.info.run_id,
                                                                         mlflow_metric_name(f"{kind}/{name}"))}
            assert history[step] == pytest.approx(value, rel=1e-6), (kind, step, name)
    assert "test/coco.AP.with_mask" in mlflow_run.data.metrics and "test/coco.AP" in mlflow_run.data.metrics
    params = mlflow_run.data.params
    assert (params["report_to"], params["world_size"], params["lr"]) == ("all", "1", "0.005")
    assert mlflow_run.info.run_name == tracked_run.name


def _mlflow_runs(run_dir: Path) -> tuple:
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    return client, client.search_runs([client.get_experiment_by_name("distdet").experiment_id])


@pytest.mark.slow
def test_only_the_main_process_of_two_reports(tmp_path: Path) -> None:
    out = tmp_path / "run"
    check_ok(run(launch_command(_tracked_args(tmp_path, out)), **TRACKER_ENV))
    assert json.loads((out / "config.json").read_text())["resolved"]["world_size"] == 2
    assert len(list((out / "wandb").glob("offline-run-*/run-*.wandb"))) == 1
    assert len(_mlflow_runs(out)[1]) == 1
    assert not (out / "tensorboard").exists()  # FAST's --no-tensorboard takes it out of "all"


def test_tensorboard_is_the_default_and_no_tensorboard_still_turns_it_off() -> None:
    assert resolve_trackers(parse_config([]).report_to) == ["tensorboard"]
    cfg = parse_config(["--no-tensorboard"])
    assert resolve_trackers(cfg.report_to, cfg.tensorboard) == []
    assert resolve_trackers("none") == []
    assert resolve_trackers("all") == ["tensorboard", "wandb", "mlflow"]  # all three are installed here


def test_unknown_report_to_is_a_flag_error(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--report-to", "comet"])
    assert exit_info.value.code == 2
    assert "--report-to" in capsys.readouterr().err


def test_a_tracker_whose_package_is_missing_is_a_flag_error(monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # how Python marks a module as not importable
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--report-to", "wandb"])
    assert exit_info.value.code == 2
    assert "--report-to wandb needs the wandb package" in capsys.readouterr().err
    assert resolve_trackers("all") == ["tensorboard", "mlflow"]  # "all": the installed ones
