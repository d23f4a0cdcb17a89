"""Trainer on one process: files of a run, resume, exact resume, precision, NaN handling, config."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distdet.modeling.model_card import load_detector_model
from distdet.training.checkpoints import latest_checkpoint
from distdet.training.config import TrainConfig, flag_name, parse_config
from support.trainer import (
    FAST, assert_same_weights, check_ok, child_env, free_port, load_weights, make_tiny_dataset, read_jsonl, run,
    train_command, wait_for,
)

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("data"))


def test_help_lists_every_flag():
    done = check_ok(run(train_command(["--help"]), timeout=120))
    for field in TrainConfig.__dataclass_fields__:
        assert flag_name(field) in done.stdout, f"{flag_name(field)} missing from --help"


def test_config_file_values_and_flag_override(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("lr: 1e-3\nepochs: 7\nlr-milestones: [3, 5]\nno_decay_norm_bias: true\nmodel: fasterrcnn_mobilenet_v3_large_fpn\n")
    cfg = parse_config(["--config", str(yaml_file), "--epochs", "9"])
    assert (cfg.lr, cfg.epochs, cfg.lr_milestones, cfg.no_decay_norm_bias) == (1e-3, 9, [3, 5], True)
    assert cfg.model == "fasterrcnn_mobilenet_v3_large_fpn"
    toml_file = tmp_path / "run.toml"
    toml_file.write_text('optimizer = "adamw"\nbatch_size = 8\ntensorboard = false\n')
    cfg = parse_config(["--config", str(toml_file), "--tensorboard"])
    assert (cfg.optimizer, cfg.batch_size, cfg.tensorboard) == ("adamw", 8, True)
    # defaults reproduce the tutorial's recipe
    default = parse_config([])
    assert (default.model, default.optimizer, default.lr, default.momentum, default.weight_decay,
            default.batch_size, default.epochs) == ("fasterrcnn_resnet50_fpn", "sgd", 0.005, 0.9, 5e-4, 4, 30)


@pytest.mark.parametrize("content, message", [
    ("lrr: 0.1\n", "unknown option 'lrr'"),
    ("epochs: many\n", "option 'epochs': expected int"),
    ("optimizer: adam\n", "'adam' is not one of"),
])
def test_bad_config_file_names_file_and_option(tmp_path, capsys, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(SystemExit):
        parse_config(["--config", str(path)])
    err = capsys.readouterr().err
    assert str(path) in err and message in err


def test_train_writes_run_folder_and_resumes(data_dir, tmp_path):
    out = tmp_path / "run"
    done = check_ok(run(train_command([*FAST, "--data-dir", str(data_dir), "--output-dir", str(out), "--epochs", "1",
                                       "--tensorboard"])))
    config = json.loads((out / "config.json").read_text())
    assert config["resolved"]["world_size"] == 1
    assert config["config"]["epochs"] == 1 and config["config"]["model"] == "fasterrcnn_mobilenet_v3_large_320_fpn"
    assert set(config["versions"]) >= {"torch", "torchvision", "accelerate"}
    assert config["split_manifest"]["contents"]["train"] == json.loads((out / "split.json").read_text())["train"]
    train = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5]  # 9 images, batch 2
    assert all(math.isfinite(r["loss"]) and r["images_per_s"] > 0 for r in train)
    assert {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg", "lr"} <= set(train[0])
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert latest_checkpoint(out).name == "step_000005"
    model, card = load_detector_model(out)
    assert card.model == "fasterrcnn_mobilenet_v3_large_320_fpn" and card.build["min_size"] == 64
    assert json.loads((out / "report.json").read_text())["status"] == "finished"
    assert "run folder" in done.stderr

    # a second run into the same folder must not silently start over
    again = run(train_command([*FAST, "--data-dir", str(data_dir), "--output-dir", str(out), "--epochs", "2"]))
    assert again.returncode == 1 and "already holds checkpoints" in again.stderr

    check_ok(run(train_command([*FAST, "--data-dir", str(data_dir), "--output-dir", str(out), "--epochs", "2",
                                "--resume", "auto"])))
    events = read_jsonl(out / "events.jsonl")
    resumed = [e for e in events if e["event"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["global_step"] == 5 and resumed[0]["checkpoint"].endswith("step_000005")
    train = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 11))
    assert latest_checkpoint(out).name == "step_000010"


def test_deterministic_resume_is_bit_identical(data_dir, tmp_path):
    """7 steps straight == 3 steps (mid-epoch), stop, resume to 7 (across an epoch end); with workers
    and a weight EMA: the raw weights of the last checkpoint, its EMA and model.pt (the EMA's) agree."""
    common = [*FAST, "--data-dir", str(data_dir), "--epochs", "3", "--deterministic", "--workers", "1",
              "--grad-accum-steps", "1", "--ema-decay", "0.8", "--ema-tau", "2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    first = subprocess.Popen(train_command([*common, "--output-dir", str(straight), "--max-steps", "7"]),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    check_ok(run(train_command([*common, "--output-dir", str(split), "--max-steps", "3"])))
    state = json.loads((latest_checkpoint(split) / "trainer_state.json").read_text())
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (0, 3, 3)
    check_ok(run(train_command([*common, "--output-dir", str(split), "--max-steps", "7", "--resume", "auto"])))
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-4000:]
    assert_same_weights(load_weights(straight), load_weights(split))
    a = [r["loss"] for r in read_jsonl(straight / "metrics.jsonl") if r["kind"] == "train"]
    b = [r["loss"] for r in read_jsonl(split / "metrics.jsonl") if r["kind"] == "train"]
    assert a == b and len(a) == 7
    for piece in ("model.safetensors", "ema.safetensors"):
        assert_same_weights(*(load_file(latest_checkpoint(run_dir) / piece) for run_dir in (straight, split)))
    ema = load_file(latest_checkpoint(split) / "ema.safetensors")
    assert all(torch.equal(load_weights(split)[name], value) for name, value in ema.items())
    info = json.loads((split / "model_card.json").read_text())["info"]
    assert (info["weights_kind"], info["ema_updates"], info["ema_decay"]) == ("ema", 7, 0.8)


def test_gradient_accumulation_and_grouping_run(data_dir, tmp_path):
    out = tmp_path / "run"
    check_ok(run(train_command([*FAST, "--data-dir", str(data_dir), "--output-dir", str(out), "--epochs", "1",
                                "--grad-accum-steps", "2", "--aspect-ratio-group-factor", "1", "--clip-grad-norm",
                                "1.0", "--no-decay-norm-bias", "--lr-schedule", "cosine", "--ema-decay", "0.99"])))
    state = json.loads((latest_checkpoint(out) / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and state["updates"] == 3  # 5 batches -> groups of 2, 2, 1
    assert json.loads((latest_checkpoint(out) / "ema.json").read_text())["updates"] == 3  # once per optimizer step


def test_bf16_on_cpu_trains(data_dir, tmp_path):
    out = tmp_path / "run"
    check_ok(run(train_command([*FAST, "--data-dir", str(data_dir), "--output-dir", str(out), "--max-steps", "2",
                                "--mixed-precision", "bf16"])))
    assert json.loads((out / "config.json").read_text())["resolved"]["mixed_precision"] == "bf16"
    losses = [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


def test_fp16_on_cpu_is_refused(data_dir, tmp_path):
    done = run(train_command([*FAST, "--data-dir", str(data_dir), "--output-dir", str(tmp_path / "r"),
                              "--mixed-precision", "fp16"]), timeout=120)
    assert done.returncode == 2
    assert "fp16" in done.stderr and "bf16" in done.stderr and "silently" in done.stderr
    # the launcher's setting is checked too
    done = run(train_command([*FAST, "--data-dir", str(data_dir), "--output-dir", str(tmp_path / "r")]),
               timeout=120, ACCELERATE_MIXED_PRECISION="fp16")
    assert done.returncode == 2 and "bf16" in done.stderr


def test_nan_loss_is_skipped_and_reported(data_dir, tmp_path):
    out = tmp_path / "run"
    check_ok(run(train_command([*FAST, "--data-dir", str(data_dir), "--output-dir", str(out), "--max-steps", "3",
                                "--debug-nan-at-step", "1"])))
    bad = [e for e in read_jsonl(out / "events.jsonl") if e["event"] == "bad_step"]
    assert len(bad) == 1 and bad[0]["global_step"] == 1
    assert math.isnan(bad[0]["components"]["rank0"]["loss"])
    assert all(math.isfinite(v) for k, v in bad[0]["components"]["rank0"].items() if k != "loss")
    report = json.loads((out / "report.json").read_text())
    assert report["global_step"] == 3 and report["updates"] == 2
    assert all(torch.isfinite(t).all() for t in load_weights(out).values() if t.is_floating_point())


def test_consecutive_bad_steps_stop_with_error(data_dir, tmp_path):
    done = run(train_command([*FAST, "--data-dir", str(data_dir), "--output-dir", str(tmp_path / "run"),
                              "--debug-nan-at-step", "0", "1", "2", "3", "--max-bad-steps", "3"]))
    assert done.returncode == 1
    assert "3 consecutive steps with a non-finite loss" in done.stderr


def test_crash_mid_save_leaves_previous_checkpoint_latest(data_dir, tmp_path):
    """SIGKILL while a checkpoint is being written; --resume auto picks the previous one and finishes."""
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    proc = subprocess.Popen(train_command([*FAST, "--data-dir", str(data_dir), "--output-dir", str(out),
                                           "--epochs", "20", "--checkpoint-every", "1"]),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=child_env())
    try:
        # wait until a complete checkpoint exists and the next one is being written
        wait_for(lambda: latest_checkpoint(out) is not None and any(p.name.startswith(".tmp_step_") for p in ckpts.iterdir()),
                 timeout=300, interval=0.002, what="a checkpoint being written")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    tmp = [p for p in ckpts.iterdir() if p.name.startswith(".tmp_step_")]
    assert tmp, "the kill did not land during a save"
    previous = latest_checkpoint(out)
    assert int(previous.name.split("_")[1]) < int(tmp[0].name.split("_")[-1])
    check_ok(run(train_command([*FAST, "--data-dir", str(data_dir), "--output-dir", str(out), "--epochs", "20",
                                "--resume", "auto", "--max-steps", str(int(previous.name.split("_")[1]) + 1)])))
    resumed = [e for e in read_jsonl(out / "events.jsonl") if e["event"] == "resumed"]
    assert resumed[-1]["checkpoint"] == str(previous)
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".tmp_")]  # cleaned by the next save


@pytest.mark.parametrize("workers, whole_group", [(0, False), (2, True)], ids=["main-process", "group-with-workers"])
def test_sigterm_single_process_checkpoints_and_exits_75(data_dir, tmp_path, workers, whole_group):
    """SIGTERM to the trainer alone, or to its whole process group as Slurm and ``kill -- -PGID``
    do, DataLoader workers included: either way a checkpoint, then exit 75."""
    out = tmp_path / "run"
    proc = subprocess.Popen(train_command([*FAST, "--data-dir", str(data_dir), "--output-dir", str(out),
                                           "--epochs", "50", "--workers", str(workers)]),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=child_env(),
                            start_new_session=True)
    metrics = out / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2, timeout=300,
             what="two logged steps")
    if whole_group:
        group = [pid for pid in _process_group(proc.pid) if pid != proc.pid]
        assert len(group) >= workers, f"expected {workers} DataLoader workers in the group, found {group}"
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    notes = json.loads((out / "interruptions.json").read_text())
    assert notes[-1]["signals"] == {"rank0": "SIGTERM"}
    state = json.loads((latest_checkpoint(out) / "trainer_state.json").read_text())
    assert state["global_step"] == notes[-1]["global_step"] >= 2
    assert "resume with --resume auto" in err


def _process_group(pgid: int) -> list[int]:
    """Pids of the live processes in process group ``pgid`` (from /proc)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended meanwhile
        if int(fields[2]) == pgid:
            pids.append(int(stat.parent.name))
    return pids


WORLD_SIZE_GUARD = textwrap.dedent("""
    import os
    import sys
    from accelerate import Accelerator
    from distdet.runtime.accelerator import LaunchError, check_launch
    # without cpu=True on a machine without CUDA, Accelerate sees ONE process under torchrun
    accelerator = Accelerator(cpu=False)
    try:
        check_launch(accelerator)
        line = f"rank {os.environ['RANK']} ACCEPTED {accelerator.num_processes}"
    except LaunchError as exc:
        line = f"rank {os.environ['RANK']} REFUSED {exc}"
    # one write per line: both ranks share the pipe, and print() writes its pieces separately
    # when output is unbuffered, so the lines could interleave mid-line
    sys.stdout.write(line + "\\n")
    sys.stdout.flush()
""")


def test_world_size_above_one_with_single_process_accelerator_is_refused(tmp_path):
    """The torchrun trap, for real: 2 processes, but each Accelerator sees one -> clear refusal."""
    if torch.cuda.is_available():
        pytest.skip("with CUDA, Accelerate builds a real 2-process state here")
    script = tmp_path / "guard.py"
    script.write_text(WORLD_SIZE_GUARD)
    done = check_ok(run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                         "--master_port", str(free_port()), str(script)], timeout=180))
    for rank in (0, 1):
        assert f"rank {rank} REFUSED the launcher set WORLD_SIZE=2 but Accelerate sees a single process" in done.stdout
    assert "ACCEPTED" not in done.stdout and "cpu_2proc.yaml" in done.stdout


def test_distdet_train_subcommand_trains(data_dir, tmp_path):
    out = tmp_path / "run"
    check_ok(run([sys.executable, "-m", "distdet", "train", *FAST, "--data-dir", str(data_dir),
                  "--output-dir", str(out), "--max-steps", "1", "--lr", "0.001"]))
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["lr"] == 0.001 and config["config"]["max_steps"] == 1
    assert (out / "model.pt").is_file()


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.y*ml")),
                         ids=lambda p: p.name)
def test_shipped_config_files_load(path):
    cfg = parse_config(["--config", str(path)])
    assert cfg.config == str(path)
