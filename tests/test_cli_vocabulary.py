"""One command line: torch-free parsers, old spellings as hidden aliases, one runtime and one exit policy."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from distdet.cli import build_parser, main as cli_main
from distdet.runtime.sharding import shard_batches
from distdet.training.config import config_from_namespace

REPO = Path(__file__).resolve().parents[1]

TORCH_FREE_HELP = """
import runpy, sys
sys.argv = {argv!r}
try:
    {run}
except SystemExit as exc:
    assert exc.code == 0, exc.code
heavy = sorted(m for m in ("torch", "torchvision", "accelerate") if m in sys.modules)
print("HEAVY", heavy)
"""


@pytest.mark.parametrize("argv, run", [
    (["train.py", "--help"], "runpy.run_path('train.py', run_name='__main__')"),
    (["distdet", "--help"], "runpy.run_module('distdet', run_name='__main__')"),
    (["distdet", "train", "--help"], "runpy.run_module('distdet', run_name='__main__')"),
    (["distdet", "evaluate", "--help"], "runpy.run_module('distdet', run_name='__main__')"),
    (["distdet", "predict", "--help"], "runpy.run_module('distdet', run_name='__main__')"),
])
def test_help_builds_the_parsers_without_torch(argv, run):
    code = TORCH_FREE_HELP.format(argv=argv, run=run)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout
    assert "HEAVY []" in done.stdout


def _parsed(argv: list[str]) -> dict:
    values = vars(build_parser().parse_args(argv))
    values.pop("func")
    return values


@pytest.mark.parametrize("new, old", [
    (["evaluate", "--model-dir", "m", "--split-part", "all", "--output-dir", "o", "--workers", "1"],
     ["evaluate", "--checkpoint", "m", "--split", "all", "--out", "o", "--num-workers", "1"]),
    (["predict", "--model-dir", "m", "a.png", "--output-dir", "o"],
     ["predict", "--checkpoint", "m", "a.png", "--out", "o"]),
    (["export", "--model-dir", "m", "--format", "onnx", "--output-file", "m.onnx"],
     ["export", "--checkpoint", "m", "--format", "onnx", "--out", "m.onnx"]),
    (["report", "run", "--output-dir", "plots"], ["report", "run", "--out", "plots"]),
    (["train", "--split-scheme", "stratified"], ["train", "--split", "stratified"]),
])
def test_old_spellings_parse_like_the_new_names_and_are_not_listed(new, old, capsys):
    assert _parsed(old) == _parsed(new)
    with pytest.raises(SystemExit):
        build_parser().parse_args([new[0], "--help"])
    listed = set(re.findall(r"^  (--[\w-]+)", capsys.readouterr().out, flags=re.MULTILINE))
    assert listed and not listed & {"--checkpoint", "--split", "--out", "--num-workers"}


def test_a_missing_model_dir_names_the_new_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["predict", "a.png", "--output-dir", "o"])
    assert exc.value.code == 2 and "--model-dir" in capsys.readouterr().err


@pytest.mark.parametrize("key", ["split", "split_scheme", "split-scheme"])
def test_config_files_accept_the_old_and_new_key(tmp_path, key):
    path = tmp_path / "run.yaml"
    path.write_text(f"{key}: stratified\n")
    cfg = config_from_namespace(build_parser().parse_args(["train", "--config", str(path)]))
    assert cfg.split_scheme == "stratified"


def test_flags_override_the_config_file_from_the_parsed_argv_not_sys_argv(tmp_path, monkeypatch):
    """``distdet train`` used to tell given flags from defaults by re-reading sys.argv."""
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 7\nlr: 0.02\ntensorboard: false\n")
    monkeypatch.setattr(sys, "argv", ["something-else"])
    args = build_parser().parse_args(["train", "--config", str(path), "--epochs", "9", "--tensorboard"])
    cfg = config_from_namespace(args)
    assert (cfg.epochs, cfg.lr, cfg.tensorboard) == (9, 0.02, True)
    # a flag given with its default value still wins over the file
    args = build_parser().parse_args(["train", "--config", str(path), "--epochs", "30"])
    assert config_from_namespace(args).epochs == 30


@pytest.mark.parametrize("command", [
    ["evaluate", "--data-dir", "nowhere"],
    ["predict", "a.png", "--output-dir", "o"],
])
def test_evaluate_and_predict_refuse_fp16_on_cpu_like_train(command, tmp_path, capsys):
    if __import__("torch").cuda.is_available():
        pytest.skip("fp16 is allowed on a CUDA GPU")
    status = cli_main([*command, "--model-dir", str(tmp_path / "model"), "--mixed-precision", "fp16"])
    err = capsys.readouterr().err
    assert status == 2
    assert "fp16" in err and "bf16" in err and "silently" in err and "Traceback" not in err


@pytest.mark.parametrize("num_items", [0, 1, 5, 7, 12])
@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_unpadded_shards_hand_out_every_batch_exactly_once(num_items, batch_size):
    single = shard_batches(num_items, batch_size, 1, 0, pad=False)
    assert [i for b in single for i in b] == list(range(num_items))
    for world in (2, 3, 4):
        shards = [shard_batches(num_items, batch_size, world, rank, pad=False) for rank in range(world)]
        assert sorted(b for s in shards for b in s) == single
        assert max(map(len, shards)) - min(map(len, shards)) <= 1


STATUSES = (0, 75, 1, 2)


def _finish_in_groups(rank: int, world: int, folder: str) -> None:
    """For each status: join a fresh gloo group of ``world`` ranks, finish, record what is left."""
    import torch.distributed as dist

    from distdet.runtime.accelerator import finish_process

    for status in STATUSES:
        store = dist.FileStore(str(Path(folder, f"store{status}")), world)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
        assert dist.get_world_size() == world
        dist.barrier()
        returned = finish_process(status)
        Path(folder, f"rank{rank}-{status}").write_text(f"{returned} {dist.is_initialized()}")
        if dist.is_initialized():
            dist.destroy_process_group()


def test_finish_process_leaves_the_group_after_0_and_75_only(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_finish_in_groups, args=(2, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        left = {status: (tmp_path / f"rank{rank}-{status}").read_text() for status in STATUSES}
        assert left == {0: "0 False", 75: "75 False", 1: "1 True", 2: "2 True"}
