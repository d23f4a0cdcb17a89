"""The weight EMA on its own: the ramp and update rule by hand, BatchNorm buffers, state, flags."""
from __future__ import annotations

import logging
import math

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from distdet.training.config import parse_config
from distdet.training.ema import ModelEMA, build_ema, parameters_digest


def _tiny() -> nn.Module:
    """A linear layer (trained), a frozen one, and a trainable BatchNorm with running statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1), nn.BatchNorm1d(1))
    model[1].requires_grad_(False)
    return model


def test_ramp_and_update_match_a_hand_computation():
    model = _tiny()
    start = model[0].weight.detach().double().clone()
    ema = ModelEMA(model, decay=0.9, tau=2.0)
    assert ema.decay_at(0) == 0.0 and ema.decay_at(10_000) == pytest.approx(0.9)
    expected = start
    for u, value in enumerate([1.0, -3.0, 0.5], start=1):
        with torch.no_grad():
            model[0].weight.fill_(value)
        ema.update()
        d = 0.9 * (1.0 - math.exp(-u / 2.0))  # the ramp, by hand
        assert ema.decay_at(u) == pytest.approx(d, rel=1e-12)
        expected = d * expected + (1.0 - d) * value
        assert torch.allclose(ema.module[0].weight.double(), expected, rtol=0, atol=1e-6)
    assert ema.updates == 3
    assert ema.module[0].weight.dtype == torch.float32 and not ema.module[0].weight.requires_grad


def test_frozen_parameters_are_not_averaged():
    model = _tiny()
    ema = ModelEMA(model, decay=0.5, tau=1.0)
    frozen = model[1].weight.detach().clone()
    with torch.no_grad():
        model[1].weight.add_(1.0)  # never happens in training; shows the copy is not tracked
    ema.update()
    assert torch.equal(ema.module[1].weight, frozen)


def test_buffers_are_copied_from_the_live_model_when_used():
    model = _tiny()
    ema = ModelEMA(model, decay=0.5, tau=1.0)
    model.train()
    model(torch.randn(8, 2))  # moves the live running statistics
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update()
    used = ema.weights_for_use(model, Accelerator(cpu=True))
    assert used is ema.module and not used.training
    for mine, live in zip(used.buffers(), model.buffers()):
        assert torch.equal(mine, live)
    assert not torch.equal(used[0].weight, model[0].weight)  # parameters stay averaged


def test_state_round_trips_and_a_mismatch_names_the_problem():
    model = _tiny()
    ema = ModelEMA(model, decay=0.9, tau=2.0)
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    ema.update()
    other = ModelEMA(_tiny(), decay=0.9, tau=2.0)
    other.load(ema.state_tensors(), ema.state_info())
    assert other.updates == 1
    assert parameters_digest(other.state_tensors().items()) == parameters_digest(ema.state_tensors().items())
    tensors = ema.state_tensors()
    with pytest.raises(ValueError, match=r"missing \['0.bias'\]"):
        other.load({k: v for k, v in tensors.items() if k != "0.bias"}, ema.state_info())
    with pytest.raises(ValueError, match="0.weight has shape"):
        other.load({**tensors, "0.weight": torch.zeros(3, 3)}, ema.state_info())
    with pytest.raises(ValueError, match="update count"):
        other.load(tensors, {"updates": -1})


def test_digest_tells_one_bit_apart():
    tensors = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0])}
    flipped = {**tensors, "b": torch.tensor([3.0]).view(torch.int32).add(1).view(torch.float32)}
    assert parameters_digest(tensors.items()) == parameters_digest(reversed(list(tensors.items())))
    assert parameters_digest(tensors.items()) != parameters_digest(flipped.items())


def test_build_ema_is_off_by_default_and_warns_when_the_ramp_outlasts_the_run(caplog):
    assert build_ema(parse_config([]), _tiny(), total_updates=770) is None
    with caplog.at_level(logging.WARNING, logger="distdet"):
        ema = build_ema(parse_config(["--ema-decay", "0.99"]), _tiny(), total_updates=770)
    assert (ema.decay, ema.tau) == (0.99, 2000.0)
    assert "--ema-tau 2000 is long for a run of 770 optimizer updates" in caplog.text and "(77)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="distdet"):
        build_ema(parse_config(["--ema-decay", "0.99", "--ema-tau", "75"]), _tiny(), total_updates=770)
    assert not caplog.text


def test_flags_and_config_keys(tmp_path):
    assert parse_config([]).ema_decay is None  # off by default
    cfg = parse_config(["--ema-decay", "0.99", "--ema-tau", "75"])
    assert (cfg.ema_decay, cfg.ema_tau) == (0.99, 75.0)
    yaml_file, toml_file = tmp_path / "run.yaml", tmp_path / "run.toml"
    yaml_file.write_text("ema_decay: 0.9998\nema-tau: 50\n")
    toml_file.write_text("ema_decay = 0.995\n")
    assert (parse_config(["--config", str(yaml_file)]).ema_decay, parse_config(["--config", str(yaml_file)]).ema_tau) \
        == (0.9998, 50.0)
    assert parse_config(["--config", str(toml_file)]).ema_decay == 0.995


@pytest.mark.parametrize("argv, config_file, message", [
    (["--ema-decay", "1"], None, "--ema-decay must be in (0, 1), got 1.0"),
    (["--ema-decay", "0"], None, "--ema-decay must be in (0, 1), got 0.0"),
    (["--ema-decay", "-0.5"], None, "--ema-decay must be in (0, 1)"),
    (["--ema-decay", "nan"], None, "--ema-decay must be a finite number"),
    (["--ema-decay", "fast"], None, "--ema-decay: invalid float value"),
    (["--ema-decay", "0.9", "--ema-tau", "0"], None, "--ema-tau must be positive, got 0.0"),
    ([], "ema_decay: 1.5\n", "--ema-decay must be in (0, 1), got 1.5"),
])
def test_bad_ema_values_exit_2_naming_the_flag(tmp_path, capsys, argv, config_file, message):
    if config_file is not None:
        (tmp_path / "bad.yaml").write_text(config_file)
        argv = ["--config", str(tmp_path / "bad.yaml")]
    with pytest.raises(SystemExit) as exit_info:
        parse_config(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
