"""The trainer's building blocks in isolation: sampler, schedule, optimizer groups, checkpoint lookup."""
from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch
from torch import nn

from distdet.training.checkpoint_files import CheckpointError, write_marker
from distdet.training.checkpoints import COMPLETE_MARKER, STATE_NAME, TrainerState, latest_checkpoint, resolve_resume
from distdet.training.config import TrainConfig
from distdet.training.optim import build_optimizer, effective_lr, lr_factor_fn, parameter_groups
from distdet.training.sampling import EpochBatchSampler, SeededSampleDataset, aspect_ratio_groups


def _all_ranks(size, batch, world, seed=0, groups=None, epoch=0):
    samplers = [EpochBatchSampler(size, batch, world, r, seed, group_ids=groups) for r in range(world)]
    for s in samplers:
        s.set_epoch(epoch)
    return samplers


@pytest.mark.parametrize("size, world, batch", [(9, 2, 2), (10, 3, 4), (7, 1, 3), (25, 4, 2)])
def test_every_index_once_per_epoch_up_to_padding(size, world, batch):
    for epoch in range(3):
        batches = [s.epoch_batches() for s in _all_ranks(size, batch, world, epoch=epoch)]
        assert len({len(b) for b in batches}) == 1  # every rank steps the same number of times
        counts = Counter(i for rank in batches for b in rank for i in b)
        assert set(counts) == set(range(size))
        padded = math.ceil(size / world) * world - size
        assert sum(counts.values()) - size == padded


def test_epochs_shuffle_differently_and_seed_reproduces():
    a0 = _all_ranks(20, 2, 2, epoch=0)[0].epoch_batches()
    a1 = _all_ranks(20, 2, 2, epoch=1)[0].epoch_batches()
    assert a0 != a1 and a0 == _all_ranks(20, 2, 2, epoch=0)[0].epoch_batches()


def test_aspect_ratio_groups_batch_alike_and_pad_ranks():
    ratios = [0.4, 2.0, 1.3, 0.7] * 6 + [1.0]
    groups = aspect_ratio_groups(ratios, 1)
    assert groups[:4] == [0, 3, 2, 1]  # edges 0.5, 1, 2
    for epoch in range(3):
        samplers = _all_ranks(len(ratios), 3, 2, groups=groups, epoch=epoch)
        batches = [s.epoch_batches() for s in samplers]
        assert len(batches[0]) == len(batches[1])
        full = [b for rank in batches for b in rank if len(b) == 3]
        assert sum(len({groups[i] for i in b}) == 1 for b in full) >= len(full) - 2  # leftovers may mix
        assert set(i for rank in batches for b in rank for i in b) == set(range(len(ratios)))


def test_start_offset_keeps_remaining_order():
    sampler = _all_ranks(11, 2, 1, epoch=4)[0]
    full = list(sampler)
    sampler.set_start(3)
    assert len(sampler) == len(full) - 3 and list(sampler) == full[3:]
    assert all(key[0] == 4 for batch in full for key in batch)


def test_seeded_dataset_is_a_function_of_seed_epoch_index():
    class Noise(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(3)

    ds = SeededSampleDataset(Noise(), seed=5)
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    a = ds[(1, 2)]
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's RNG is untouched
    torch.rand(10)
    assert torch.equal(a, ds[(1, 2)]) and not torch.equal(a, ds[(2, 2)]) and not torch.equal(a, ds[(1, 3)])


def test_schedule_warmup_multistep_and_cosine():
    cfg = TrainConfig(epochs=4, warmup_steps=-1, warmup_factor=0.001, lr_milestones=[2, 3], lr_gamma=0.1)
    f = lr_factor_fn(cfg, steps_per_epoch=10)  # tutorial warmup: min(1000, 10 - 1) = 9 steps
    assert f(0) == pytest.approx(0.001) and f(9) == 1.0 and 0.001 < f(4) < 1.0
    assert f(19) == 1.0 and f(20) == pytest.approx(0.1) and f(30) == pytest.approx(0.01)
    cos = lr_factor_fn(TrainConfig(epochs=2, warmup_steps=0, lr_schedule="cosine"), steps_per_epoch=10)
    assert cos(0) == 1.0 and cos(10) == pytest.approx(0.5) and cos(20) == pytest.approx(0.0, abs=1e-12)


def test_lr_is_for_the_global_batch_with_optional_linear_scaling():
    assert effective_lr(TrainConfig(lr=0.02), global_batch=64) == 0.02
    assert effective_lr(TrainConfig(lr=0.02, scale_lr_from_batch=16), global_batch=64) == pytest.approx(0.08)


def test_no_decay_on_norm_and_bias():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    decay, no_decay = parameter_groups(model, 5e-4, no_decay_norm_bias=True)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3, 3, 3]), torch.Size([2, 4])]
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0
    opt = build_optimizer(model, TrainConfig(optimizer="adamw", no_decay_norm_bias=True), lr=1e-3)
    assert isinstance(opt, torch.optim.AdamW) and [g["weight_decay"] for g in opt.param_groups] == [5e-4, 0.0]


def _fake_checkpoint(run_dir, step, complete=True):
    folder = run_dir / "checkpoints" / f"step_{step:06d}"
    folder.mkdir(parents=True)
    (folder / STATE_NAME).write_text(json.dumps(TrainerState(global_step=step).to_json()))
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 8)
    if complete:
        write_marker(folder, {"model": ["model.safetensors"], "trainer_state": [STATE_NAME]})
    return folder


def test_latest_ignores_temporary_and_unmarked_folders(tmp_path):
    good = _fake_checkpoint(tmp_path, 4)
    _fake_checkpoint(tmp_path, 8, complete=False)
    (tmp_path / "checkpoints" / ".tmp_step_000012").mkdir()
    assert latest_checkpoint(tmp_path) == good
    assert resolve_resume("auto", tmp_path) == (good, None)
    assert resolve_resume(str(tmp_path), None) == (good, tmp_path)
    assert resolve_resume(str(good), None) == (good, tmp_path)
    assert resolve_resume("none", tmp_path) == (None, None)
    with pytest.raises(FileNotFoundError, match="incomplete"):
        resolve_resume(str(tmp_path / "checkpoints" / "step_000008"), None)
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        resolve_resume(str(tmp_path / "nowhere"), None)


def test_resume_auto_falls_back_past_a_checkpoint_that_fails_its_checksums(tmp_path, caplog):
    older, newer = _fake_checkpoint(tmp_path, 4), _fake_checkpoint(tmp_path, 8)
    with open(newer / "model.safetensors", "r+b") as handle:  # same size, other bytes
        handle.seek(700)
        handle.write(b"garbage")
    assert resolve_resume("auto", tmp_path) == (older, None)
    assert "model.safetensors fails its SHA-256 check" in caplog.text and str(newer) in caplog.text
    with pytest.raises(CheckpointError, match="step_000008: model.safetensors fails its SHA-256"):
        resolve_resume(str(newer), None)
    (older / "model.safetensors").write_bytes(b"short")  # truncated: no checkpoint verifies
    with pytest.raises(CheckpointError, match=r"no checkpoint of .* verifies: .*model.safetensors has 5 bytes"):
        resolve_resume("auto", tmp_path)


def test_trainer_state_with_wrong_types_names_file_and_key(tmp_path):
    folder = _fake_checkpoint(tmp_path, 4)
    (folder / STATE_NAME).write_text(json.dumps({**TrainerState().to_json(), "epoch": "three"}))
    write_marker(folder, {"trainer_state": [STATE_NAME]})  # consistent checksums: the content is the problem
    with pytest.raises(CheckpointError, match=r"trainer_state.json: 'epoch' is 'three', expected an integer"):
        resolve_resume(str(folder), None)


def test_marker_without_checksums_is_not_trusted(tmp_path):
    folder = _fake_checkpoint(tmp_path, 4)
    (folder / COMPLETE_MARKER).write_text(json.dumps({"complete": True}))  # the format before checksums
    with pytest.raises(CheckpointError, match="lists no file checksums"):
        resolve_resume(str(folder), None)
