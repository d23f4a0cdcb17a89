"""Training plots from a run's ``metrics.jsonl``, for users without TensorBoard.

``metrics.jsonl`` holds one JSON object per line. Training lines carry ``step`` and loss
values (keys starting with ``loss``) and usually ``lr``; evaluation lines carry metric values
(``voc/mAP50``, ``coco/AP`` ...) with ``epoch`` and/or ``step``. A ``kind`` key (``train``,
``val``, ``test`` ...), when present, names the series. Lines that are not JSON objects (a
line cut short by a crash, say) are skipped and counted. When a resumed run logs a step
again, the later line wins.

:func:`write_training_plots` writes, into ``<run>/plots/``:

- ``losses.png``: every loss component over optimizer steps (one panel each);
- ``lr.png``: the learning rate over steps;
- ``eval_metrics.png``: every evaluation metric over epochs (over steps without epochs),
  grouped into panels by name (see :func:`metric_panels`); a per-class line is drawn in its
  class colour (:func:`distdet.classes.class_colours` of the run's class list, read from its
  ``model_card.json`` or, while the run is going, its ``config.json``).

Plots without data are not written; the paths written are returned.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import MaxNLocator  # noqa: E402

from distdet.classes import class_colours  # noqa: E402
from distdet.io_utils import atomic_write  # noqa: E402

METRICS_NAME = "metrics.jsonl"
PLOTS_DIR = "plots"
#: Keys that index or describe a record rather than measure something.
INDEX_KEYS = frozenset({"step", "epoch", "kind", "time", "timestamp", "wall_time", "global_step", "split"})
#: A smoothed loss curve (running mean over 1/25 of the points, at least 5) is drawn over
#: the logged values when a series has more points than this.
SMOOTH_ABOVE = 50


@dataclass
class TrainingLog:
    """Series read from ``metrics.jsonl``: ``{name: {x: value}}``, x being a step or an epoch."""

    losses: dict[str, dict[float, float]] = field(default_factory=lambda: defaultdict(dict))
    lr: dict[float, float] = field(default_factory=dict)
    #: ``{kind: {metric: {x: value}}}``; ``eval_axis[kind]`` says whether x is "epoch" or "step".
    metrics: dict[str, dict[str, dict[float, float]]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(dict)))
    eval_axis: dict[str, str] = field(default_factory=dict)
    skipped_lines: int = 0


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _is_loss(key: str) -> bool:
    return key.startswith("loss")


def _is_lr(key: str) -> bool:
    return key == "lr" or key.startswith("lr/") or key.startswith("lr_")


def parse_metrics_lines(lines: Iterable[str]) -> TrainingLog:
    """Read training and evaluation series from JSON lines (see the module docstring)."""
    log = TrainingLog()
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            log.skipped_lines += 1
            continue
        if not isinstance(record, dict):
            log.skipped_lines += 1
            continue
        step, epoch = _number(record.get("step")), _number(record.get("epoch"))
        values = {k: v for k, v in ((k, _number(v)) for k, v in record.items() if k not in INDEX_KEYS) if v is not None}
        kind = record.get("kind")
        if kind is None:
            kind = "train" if any(_is_loss(k) or _is_lr(k) for k in values) else "eval"
        if kind == "train":
            if step is None:
                continue
            for key, value in values.items():
                if _is_loss(key):
                    log.losses[key][step] = value
                elif _is_lr(key):
                    log.lr[step] = value
            continue
        kind = str(kind)
        axis = "epoch" if epoch is not None else "step" if step is not None else None
        if axis is None or log.eval_axis.setdefault(kind, axis) != axis:
            continue  # no position, or not on the axis of the series' first line
        for key, value in values.items():
            log.metrics[kind][key][epoch if axis == "epoch" else step] = value
    return log


def read_metrics_file(path: str | Path) -> TrainingLog:
    """Parse ``path``; raise FileNotFoundError naming it when it does not exist."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics log at {path}")
    with open(path, encoding="utf-8", errors="replace") as handle:
        return parse_metrics_lines(handle)


def _grid(count: int) -> tuple[int, int]:
    cols = min(3, count)
    return math.ceil(count / cols), cols


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path


def _sorted_xy(series: dict[float, float]) -> tuple[list[float], list[float]]:
    xs = sorted(series)
    return xs, [series[x] for x in xs]


def _running_mean(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _plot_losses(log: TrainingLog, path: Path) -> Path:
    names = sorted(log.losses, key=lambda k: (k != "loss", k))  # the total first
    rows, cols = _grid(len(names))
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        xs, ys = _sorted_xy(log.losses[name])
        if len(xs) > SMOOTH_ABOVE:
            window = max(5, len(xs) // 25)
            ax.plot(xs, ys, color="tab:blue", alpha=0.3, linewidth=0.8, label="logged")
            ax.plot(xs, _running_mean(ys, window), color="tab:blue", label=f"running mean of {window}")
            ax.legend(fontsize="small")
        else:
            ax.plot(xs, ys, color="tab:blue", marker="o" if len(xs) < 30 else None, markersize=3)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.suptitle("training losses")
    return _save(fig, path)


def _plot_lr(log: TrainingLog, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs, ys = _sorted_xy(log.lr)
    ax.plot(xs, ys, color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.grid(True, alpha=0.3)
    ax.set_title("learning rate")
    return _save(fig, path)


def metric_panels(log: TrainingLog) -> dict[str, list[tuple[str, str, str]]]:
    """Group evaluation metrics into panels: ``{title: [(kind, key, line label)]}``.

    ``family/name/class`` keys share the panel ``family/name`` with a line per class;
    ``family/name`` keys share the panel ``family``; other keys get a panel each. With more
    than one kind (``val``, ``test`` ...), line labels name the kind.
    """
    panels: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    several = len(log.metrics) > 1
    for kind in sorted(log.metrics):
        for key in sorted(log.metrics[kind]):
            head, _, last = key.rpartition("/")
            title, line = (head, last) if head else (key, key)
            panels[title].append((kind, key, f"{line} ({kind})" if several else line))
    return dict(sorted(panels.items()))


def run_class_names(run_dir: Path) -> list[str]:
    """The class list recorded by a run (its model card, else its config.json); [] when neither says."""
    for name, keys in (("model_card.json", ("class_names",)), ("config.json", ("resolved", "class_names"))):
        try:
            value: Any = json.loads((run_dir / name).read_text(encoding="utf-8"))
            for key in keys:
                value = value[key]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    return []


def _plot_metrics(log: TrainingLog, path: Path, class_names: list[str]) -> Path:
    colours = {name: tuple(c / 255 for c in rgb) for name, rgb in class_colours(class_names).items()}
    styles = {kind: ("-", "--", ":", "-.")[i % 4] for i, kind in enumerate(sorted(log.metrics))}
    panels = metric_panels(log)
    rows, cols = _grid(len(panels))
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.5 * rows), squeeze=False)
    for ax, (title, lines) in zip(axes.flat, panels.items()):
        for kind, key, label in lines:
            xs, ys = _sorted_xy(log.metrics[kind][key])
            ax.plot(xs, ys, marker="o", markersize=3, label=label, linestyle=styles[kind],
                    color=colours.get(key.rpartition("/")[2]))
        ax.set_xlabel(" / ".join(sorted({log.eval_axis[kind] for kind, _, _ in lines})))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize="x-small", ncol=2 if len(lines) > 6 else 1)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("evaluation metrics")
    return _save(fig, path)


def write_training_plots(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the PNG plots of ``<run_dir>/metrics.jsonl`` into ``out_dir`` (default
    ``<run_dir>/plots``) and return their paths.

    Raises FileNotFoundError naming the missing log, ValueError naming the log when it holds
    no plottable record.
    """
    run_dir = Path(run_dir)
    metrics_path = run_dir / METRICS_NAME
    log = read_metrics_file(metrics_path)
    if not log.losses and not log.lr and not log.metrics:
        raise ValueError(f"{metrics_path} holds no training or evaluation values to plot "
                         f"({log.skipped_lines} unreadable line(s))")
    out = Path(out_dir) if out_dir is not None else run_dir / PLOTS_DIR
    written: list[Path] = []
    if log.losses:
        written.append(_plot_losses(log, out / "losses.png"))
    if log.lr:
        written.append(_plot_lr(log, out / "lr.png"))
    if log.metrics:
        written.append(_plot_metrics(log, out / "eval_metrics.png", run_class_names(run_dir)))
    return written
