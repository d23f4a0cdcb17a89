"""Multi-scale training (``--min-size 64,80,96``) and ``--eval-min-size``: sizes drawn per batch on
the real training path, evaluation at one size, exact resume, model cards, bad values."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from distdet.data.images import resized_size
from distdet.modeling.model_card import ModelCard, load_detector_model, save_detector
from distdet.modeling.models import build_model
from distdet.modeling.multiscale import BatchScaleTransform
from distdet.training.checkpoints import latest_checkpoint
from distdet.training.config import parse_config
from distdet.training.multiscale import BatchScales
from support.trainer import (
    CPU_2PROC, FAST, REPO, assert_same_weights, check_ok, child_env, free_port, load_weights, make_tiny_dataset,
    read_jsonl, run,
)

pytestmark = pytest.mark.timeout(600)

MODEL = "fasterrcnn_mobilenet_v3_large_320_fpn"
PROBE = REPO / "tests" / "support" / "size_probe.py"
SIZES = [64, 80, 96]
#: the tiny dataset's images are all 96 x 72 (width x height); 9 training images, batch 2
WIDTH, HEIGHT, BATCHES_PER_EPOCH = 96, 72, 5
MULTISCALE = ["--min-size", ",".join(map(str, SIZES)), "--max-size", "160"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("data"))


def probe_command(record: Path, args: list[str]) -> list[str]:
    """train.py under the size probe: every transform forward is noted in ``record``."""
    return [sys.executable, str(PROBE), str(record), *args]


def resized(short_side: int) -> list[int]:
    """[height, width] of a tiny-dataset image resized to ``short_side`` (torchvision's floor)."""
    width, height = resized_size(WIDTH, HEIGHT, short_side, 160)
    return [height, width]


def training_short_sides(record: Path) -> list[int]:
    """Per training forward: the one height every image of the batch was resized to."""
    sides = []
    for call in (c for c in read_jsonl(record) if c["training"]):
        heights = {height for height, _ in call["image_sizes"]}
        assert len(heights) == 1, f"one batch at several sizes: {call['image_sizes']}"
        assert call["batch_shape"][2] >= heights.pop()  # what the backbone gets holds the resized images
        sides.append(call["image_sizes"][0][0])
    return sides


def test_size_list_draws_per_batch_and_evaluation_and_card_use_the_eval_size(data_dir, tmp_path):
    out, record = tmp_path / "run", tmp_path / "sizes.jsonl"
    check_ok(run(probe_command(record, [*FAST, *MULTISCALE, "--eval-min-size", "88", "--data-dir", str(data_dir),
                                        "--output-dir", str(out), "--epochs", "1", "--eval-every", "1",
                                        "--final-eval"])))
    schedule = BatchScales(SIZES, seed=42)  # FAST trains with the default --seed 42
    expected = [schedule.size_of(0, batch) for batch in range(BATCHES_PER_EPOCH)]
    assert len(set(expected)) > 1  # the check below sees the size change between batches
    assert training_short_sides(record) == [resized(size)[0] for size in expected]

    evaluations = [c for c in read_jsonl(record) if not c["training"]]
    assert len(evaluations) == 2  # the epoch-end evaluation and the final test evaluation (2 images, 1 batch)
    assert all(size == resized(88) for call in evaluations for size in call["image_sizes"])

    config = json.loads((out / "config.json").read_text())
    assert config["resolved"]["min_size"] == SIZES and config["resolved"]["eval_min_size"] == 88
    assert config["config"]["min_size"] == SIZES and config["config"]["eval_min_size"] == 88
    model, card = load_detector_model(out)
    assert (card.build["min_size"], card.build["eval_min_size"]) == (SIZES, 88)
    assert type(model.transform) is GeneralizedRCNNTransform and model.transform.min_size == (88,)


@pytest.mark.slow  # three training runs: 60-70 s on the shared 2-core machine
def test_resume_mid_epoch_with_a_size_list_is_bit_identical(data_dir, tmp_path):
    """7 steps straight == 3 steps, stop, resume to 7 (across the epoch end): same sizes, losses, weights."""
    common = [*FAST, *MULTISCALE, "--data-dir", str(data_dir), "--epochs", "3", "--deterministic"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    straight_sizes, split_sizes = tmp_path / "straight.jsonl", tmp_path / "split.jsonl"
    first = subprocess.Popen(probe_command(straight_sizes, [*common, "--output-dir", str(straight), "--max-steps", "7"]),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    check_ok(run(probe_command(split_sizes, [*common, "--output-dir", str(split), "--max-steps", "3"])))
    state = json.loads((latest_checkpoint(split) / "trainer_state.json").read_text())
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (0, 3, 3)
    check_ok(run(probe_command(split_sizes, [*common, "--output-dir", str(split), "--max-steps", "7",
                                             "--resume", "auto"])))
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-4000:]

    sides = training_short_sides(straight_sizes)
    assert len(sides) == 7 and len(set(sides)) > 1
    assert training_short_sides(split_sizes) == sides
    assert_same_weights(load_weights(straight), load_weights(split))
    losses = [[r["loss"] for r in read_jsonl(folder / "metrics.jsonl") if r["kind"] == "train"]
              for folder in (straight, split)]
    assert losses[0] == losses[1]


@pytest.mark.slow  # two gloo processes: 22 s on a quiet moment of the shared 2-core machine, ~40 s under load
def test_two_processes_train_each_step_at_one_size(data_dir, tmp_path):
    """Both ranks of a real 2-process gloo group train step s at the schedule's size of batch s."""
    out, record = tmp_path / "run", tmp_path / "sizes.jsonl"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC),
               "--num_processes", "2", "--main_process_port", str(free_port()), str(PROBE), str(record),
               *FAST, *MULTISCALE, "--data-dir", str(data_dir), "--output-dir", str(out), "--epochs", "2"]
    check_ok(run(command))
    assert json.loads((out / "config.json").read_text())["resolved"]["world_size"] == 2
    schedule = BatchScales(SIZES, seed=42)
    steps_per_epoch = 3  # 9 images over 2 ranks: 5 each, batch 2
    expected = [resized(schedule.size_of(epoch, batch))[0] for epoch in range(2) for batch in range(steps_per_epoch)]
    assert len(set(expected)) > 1
    for rank in (0, 1):
        assert training_short_sides(tmp_path / f"sizes.rank{rank}.jsonl") == expected, f"rank {rank}"


def test_bare_benchmark_loop_trains_each_batch_at_the_trainers_size(data_dir):
    """benchmarks/train_loops.bare_run (gpu_check, train_throughput --recipe) follows the trainer's schedule."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from train_loops import bare_run

    cfg = parse_config([*FAST, *MULTISCALE, "--data-dir", str(data_dir)])
    seen: list[list[int]] = []

    def note(module, inputs, output) -> None:
        if isinstance(module, GeneralizedRCNNTransform) and module.training:
            seen.append(sorted({height for height, _ in output[0].image_sizes}))

    handle = torch.nn.modules.module.register_module_forward_hook(note)
    try:
        bare_run(cfg, torch.device("cpu"), "fp32", steps=3, warmup=1)
    finally:
        handle.remove()
    schedule = BatchScales(SIZES, cfg.seed)
    assert seen == [[resized(schedule.size_of(0, batch))[0]] for batch in range(4)]


def test_batch_transform_resizes_a_batch_to_one_drawn_size_and_evaluates_at_its_own():
    model = build_model(MODEL, 3, min_size=SIZES, max_size=160, eval_min_size=88)
    transform = model.transform
    assert isinstance(transform, BatchScaleTransform) and transform.max_size == 160
    images = [torch.rand(3, 72, 96), torch.rand(3, 96, 72)]  # landscape and portrait
    drawn = iter([80, 64])
    transform.size_source = lambda: next(drawn)
    transform.train()
    assert transform.min_size == tuple(SIZES)
    assert sorted(transform(images)[0].image_sizes) == [(80, 106), (106, 80)]
    assert sorted(transform(images)[0].image_sizes) == [(64, 85), (85, 64)]
    transform.size_source = None  # no schedule: torchvision's draw, once for the whole batch
    for _ in range(5):
        sizes = transform(images)[0].image_sizes
        assert min(sizes[0]) == min(sizes[1]) and min(sizes[0]) in SIZES
    transform.eval()
    assert transform.min_size == (88,)
    assert sorted(transform(images)[0].image_sizes) == [(88, 117), (117, 88)]


def test_one_size_keeps_torchvisions_transform_and_default_eval_size_is_the_largest():
    assert type(build_model(MODEL, 3, min_size=64, max_size=96).transform) is GeneralizedRCNNTransform
    assert type(build_model(MODEL, 3, min_size=[64], max_size=96, eval_min_size=64).transform) is GeneralizedRCNNTransform
    transform = build_model(MODEL, 3, min_size=[96, 64, 80], max_size=160).eval().transform
    assert transform.min_size == (96,)  # the largest, not torchvision's last entry
    cfg = parse_config(["--min-size", "96,64,80", "--max-size", "160"])
    assert (cfg.min_size, cfg.eval_min_size) == ([96, 64, 80], None)


def test_size_schedule_is_a_function_of_seed_epoch_and_batch():
    schedule = BatchScales(SIZES, seed=3)
    first = [schedule.size_of(epoch, batch) for epoch in range(3) for batch in range(20)]
    assert set(first) == set(SIZES)
    schedule.start_epoch(1, 7)
    assert [schedule() for _ in range(3)] == [schedule.size_of(1, batch) for batch in (7, 8, 9)]
    assert first == [BatchScales(SIZES, seed=3).size_of(e, b) for e in range(3) for b in range(20)]
    assert first != [BatchScales(SIZES, seed=4).size_of(e, b) for e in range(3) for b in range(20)]


def test_card_round_trips_training_and_eval_sizes_and_old_cards_load_at_their_size(tmp_path):
    model = build_model(MODEL, 3, min_size=SIZES, max_size=160, eval_min_size=88)
    card = ModelCard(MODEL, ["a", "b", "c"], {"min_size": SIZES, "eval_min_size": 88, "max_size": 160})
    save_detector(model.eval(), card, tmp_path / "multi")
    assert ModelCard.from_file(tmp_path / "multi" / "model_card.json").build == card.build
    loaded, _ = load_detector_model(tmp_path / "multi")
    assert loaded.transform.min_size == (88,) and not loaded.training
    for name, build, size in (("old", {"min_size": 64, "max_size": 96}, 64),
                              ("no_eval", {"min_size": [64, 96, 80], "max_size": 160}, 96)):
        save_detector(build_model(MODEL, 3, **build).eval(), ModelCard(MODEL, ["a", "b", "c"], build), tmp_path / name)
        assert load_detector_model(tmp_path / name)[0].transform.min_size == (size,)


@pytest.mark.parametrize("build, message", [
    ({"min_size": []}, "build 'min_size' must be an integer or a non-empty list of integers, got []"),
    ({"min_size": [[64]]}, "build 'min_size' must be an integer or a non-empty list of integers, got [[64]]"),
    ({"min_size": [64, 0]}, "build 'min_size' must be an integer >= 1, got 0"),
    ({"min_size": [64, "80"]}, "build 'min_size' must be an integer >= 1, got '80'"),
    ({"min_size": [64, 80], "eval_min_size": 0}, "build 'eval_min_size' must be an integer >= 1, got 0"),
])
def test_bad_sizes_in_a_card_are_refused_naming_card_and_key(tmp_path, build, message):
    path = tmp_path / "model_card.json"
    path.write_text(json.dumps({"format": 1, "model": MODEL, "class_names": ["a"], "build": build}))
    with pytest.raises(ValueError) as info:
        ModelCard.from_file(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_sizes_from_config_files(tmp_path):
    for name, text in (("list.yaml", "min_size: [384, 448]\nmax_size: 800\n"),
                       ("comma.yaml", "min-size: 384,448\nmax-size: 800\n"),
                       ("list.toml", "min_size = [384, 448]\nmax_size = 800\n")):
        (tmp_path / name).write_text(text)
        assert parse_config(["--config", str(tmp_path / name)]).min_size == [384, 448], name
    (tmp_path / "one.yaml").write_text("min_size: 512\neval_min_size: 480\n")
    cfg = parse_config(["--config", str(tmp_path / "one.yaml"), "--max-size", "900"])
    assert (cfg.min_size, cfg.eval_min_size) == ([512], 480)
    assert parse_config([]).min_size == [800]


@pytest.mark.parametrize("flags, message", [
    (["--min-size", "0"], "--min-size must be one or more positive integers, got 0"),
    (["--min-size", "384,-1"], "--min-size must be one or more positive integers"),
    (["--min-size", "384,4x8"], "argument --min-size: '384,4x8': '4x8' is not an integer"),
    (["--min-size", "384,"], "argument --min-size: '384,': '' is not an integer"),
    (["--min-size", "384,448,384"], "--min-size 384,448,384 lists 384 more than once"),
    (["--min-size", "384,512", "--eval-min-size", "0"], "--eval-min-size must be in [192, 1024]"),
    (["--min-size", "384,512", "--eval-min-size", "5120"], "--eval-min-size must be in [192, 1024]"),
    (["--min-size", "384,512", "--max-size", "500"], "--max-size 500 is below the short side 512"),
    (["--min-size", "384", "--eval-min-size", "640", "--max-size", "600"],
     "--max-size 600 is below the short side 640 (--min-size 384, --eval-min-size 640)"),
    (["--eval-min-size", "x"], "argument --eval-min-size: invalid int value"),
])
def test_bad_sizes_exit_2_naming_the_flag(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("text", ["min_size: [384, true]\n", "min_size: [384, 400.5]\n", "min_size: 384,x\n"])
def test_bad_sizes_in_a_config_file_exit_2_naming_file_and_option(tmp_path, capsys, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--config", str(path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and str(path) in err and "option 'min_size'" in err
