"""Weight EMA (``--ema-decay D``): an exponential moving average of the detector's parameters.

After every optimizer update that was applied (u = 1, 2, ... counts them; a step skipped for a
non-finite loss or gradient, or by the fp16 gradient scaler, is not one), each averaged
parameter moves towards the trained one::

    ema <- d(u) * ema + (1 - d(u)) * weights,        d(u) = D * (1 - exp(-u / tau))

the warm-up ramp of Ultralytics and timm: early on d is small, so the average does not hold on
to the first, barely trained weights; after a few tau, d is D. The average then reaches back
about 1 / (1 - d) updates. Training itself continues on the raw weights; validation, ``best/``,
the test evaluation and the final ``model.pt`` use the averaged ones (see the trainer).

**Choosing D and tau** (``--ema-tau``, default 2000 as in Ultralytics). The ramp has to be
short next to the run: at u = tau, d is 0.63 D; at 3 tau, 0.95 D. The CPU recipe
(``configs/facemask_lite0_cpu.yaml``) has about 770 updates in all; with tau = 2000 its last
update would have d = 0.32 D, an average over ~1.5 updates, i.e. the raw weights. For such runs
take tau about a tenth of the run (75 there: d is 0.95 D from update ~225 on) and D so that the
reach 1 / (1 - D) is a tenth to a fifth of the run (0.99 reaches ~100 updates back); D = 0.9998
with tau = 2000 fits runs of tens of thousands of updates. :func:`build_ema` warns when the
ramp is too long for the run.

**Every rank holds the same EMA, with no communication.** The update reads the parameters of
the unwrapped model right after the optimizer step, in fp32. Those are identical on every rank:
DDP all-reduces the gradients, every rank applies the same optimizer step to the same values,
and every rank agrees on skipping a step. ``lerp_`` is a deterministic elementwise function of
them, so the averages stay bit-identical too. Checkpoints check it (each rank's digest of its
average, one gather per checkpoint; see :mod:`distdet.training.checkpoints`).

**BatchNorm buffers are copied, not averaged.** The EMA holds the parameters only; when its
weights are used (:meth:`ModelEMA.weights_for_use`), its buffers (running mean and variance,
batch counts) are those of the live model, rank 0's on every rank. Why: the detection backbones
built from pretrained weights (torchvision's, and lite0's) use frozen batch norm, whose buffers
never change, so copying and averaging agree there; with trainable batch norm, each rank's
running statistics differ after its own forward pass (DDP broadcasts rank 0's only at the start
of the next one), so averaging them would make the ranks' averages drift apart, or cost a
broadcast per step; copying costs one small broadcast per use. The running statistics are a
moving average already (momentum 0.1); they come from the raw weights' activations either way.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import math
from collections.abc import Iterable
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast
from torch import nn

from distdet.training.config import TrainConfig

logger = logging.getLogger(__name__)


class ModelEMA:
    """The averaged copy of ``model`` (fp32, eval mode, no gradients) and its update count.

    ``model`` is the unwrapped model being trained; the copy tracks its parameters that require
    gradients (the frozen ones never change, so their copies stay equal to them).
    """

    def __init__(self, model: nn.Module, decay: float, tau: float) -> None:
        if not 0.0 < decay < 1.0 or not tau > 0:
            raise ValueError(f"EMA decay must be in (0, 1) and tau positive, got {decay} and {tau}")
        self.decay, self.tau, self.updates = decay, tau, 0
        self.module = copy.deepcopy(model).float().eval().requires_grad_(False)
        self._tracked = [(averaged, live) for averaged, live in zip(self.module.parameters(), model.parameters())
                         if live.requires_grad]

    def decay_at(self, updates: int) -> float:
        """d(u) = D * (1 - exp(-u / tau)), the weight the average keeps at update ``updates``."""
        return self.decay * (1.0 - math.exp(-updates / self.tau))

    @torch.no_grad()
    def update(self) -> None:
        """Fold in the live parameters after one applied optimizer update."""
        self.updates += 1
        step = 1.0 - self.decay_at(self.updates)
        for averaged, live in self._tracked:
            averaged.lerp_(live.detach().float(), step)

    @torch.no_grad()
    def restart_from(self, model: nn.Module) -> None:
        """Start over from ``model``'s current weights, ramp included (update count 0)."""
        self.module.load_state_dict(model.state_dict())
        self.updates = 0

    @torch.no_grad()
    def weights_for_use(self, model: nn.Module, accelerator: Accelerator) -> nn.Module:
        """The averaged model with the live ``model``'s buffers, those of rank 0 on every rank.

        Every rank must call this (one broadcast of the buffers with several processes).
        """
        buffers = list(self.module.buffers())
        for mine, live in zip(buffers, model.buffers()):
            mine.copy_(live)
        if accelerator.num_processes > 1 and buffers:
            broadcast(buffers, from_process=0)
        return self.module

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The averaged parameters by name, on the CPU, for a checkpoint."""
        return {name: value.detach().cpu().contiguous() for name, value in self.module.named_parameters()}

    def state_info(self) -> dict[str, Any]:
        """The JSON half of the checkpointed state."""
        return {"decay": self.decay, "tau": self.tau, "updates": self.updates}

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
        """Restore :meth:`state_tensors` and the update count of :meth:`state_info`; decay and tau
        stay this run's. ValueError naming the problem when they do not fit this model."""
        updates = info.get("updates")
        if not isinstance(updates, int) or isinstance(updates, bool) or updates < 0:
            raise ValueError(f"the EMA update count must be a non-negative integer, got {updates!r}")
        own = dict(self.module.named_parameters())
        if set(tensors) != set(own):
            unknown, missing = sorted(set(tensors) - set(own)), sorted(set(own) - set(tensors))
            raise ValueError(f"the EMA weights do not fit the model being trained (missing {missing[:5]}, "
                             f"unexpected {unknown[:5]})")
        for name, value in tensors.items():
            if value.shape != own[name].shape:
                raise ValueError(f"the EMA weight {name} has shape {tuple(value.shape)}, the model's "
                                 f"{tuple(own[name].shape)}")
        for name, value in tensors.items():
            own[name].copy_(value)
        self.updates = updates

    def card_info(self) -> dict[str, Any]:
        """What a model card says about weights taken from this average."""
        return {"weights_kind": "ema", "ema_decay": self.decay, "ema_tau": self.tau, "ema_updates": self.updates,
                "ema_last_decay": self.decay_at(self.updates)}


def weights_info(ema: ModelEMA | None) -> dict[str, Any]:
    """The model card's note of which weights it holds: the average's, or the raw trained ones."""
    return ema.card_info() if ema is not None else {"weights_kind": "raw"}


def parameters_digest(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over the names and bytes of ``named_tensors`` in name order: equal digests, equal bits."""
    sha = hashlib.sha256()
    for name, value in sorted(named_tensors, key=lambda item: item[0]):
        sha.update(name.encode())
        sha.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return sha.hexdigest()


def build_ema(cfg: TrainConfig, model: nn.Module, total_updates: int) -> ModelEMA | None:
    """The EMA of the unwrapped ``model`` for ``--ema-decay`` (None without it); warns when the
    ramp is too long for a run of ``total_updates`` optimizer updates."""
    if cfg.ema_decay is None:
        return None
    ema = ModelEMA(model, cfg.ema_decay, cfg.ema_tau)
    final = ema.decay_at(total_updates)
    logger.info("weight EMA: decay %g, ramp tau %g updates; at the run's last update (%d) d = %.5g, reaching "
                "~%.0f updates back", ema.decay, ema.tau, total_updates, final, 1.0 / (1.0 - final))
    if total_updates < 3 * ema.tau:
        logger.warning("--ema-tau %g is long for a run of %d optimizer updates: the EMA decay only reaches %.3g x "
                       "--ema-decay by the end, so the average is close to the raw weights; take --ema-tau about a "
                       "tenth of the run (%d)", ema.tau, total_updates, final / ema.decay, max(1, total_updates // 10))
    return ema
