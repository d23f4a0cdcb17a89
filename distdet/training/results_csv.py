"""``results.csv``: one row per epoch, beside ``metrics.jsonl``, for spreadsheets (and Ultralytics users).

Columns, in order: ``epoch`` (1-based: the epochs completed), ``step`` (the last optimizer step
of the epoch), ``train/<loss>`` for each loss component (the mean of the epoch's logged
values, each the mean over its ``--log-every`` window), ``lr`` (the last logged rate of the
epoch), then ``<split>/<metric>`` for every number of the evaluations made at that epoch's end
(``val`` or ``test``). A cell without a value is empty. The file is rebuilt from
``metrics.jsonl`` each time, so a resumed run's repeated steps count once (the later line wins)
and a torn last line is skipped.
"""
from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from distdet.io_utils import atomic_write

RESULTS_NAME = "results.csv"
METRICS_NAME = "metrics.jsonl"
_NOT_MEASURED = frozenset({"kind", "step", "epoch", "time"})


def _records(path: Path) -> list[dict[str, Any]]:
    """The JSON-object lines of ``path``; for a repeated (kind, step), the last one."""
    latest: dict[tuple[str, Any], dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "kind" in record and isinstance(record.get("epoch"), int):
            latest[(record["kind"], record.get("step"))] = record
    return list(latest.values())


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items() if k not in _NOT_MEASURED
            and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def results_rows(records: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """The columns and the per-epoch rows (see the module docstring) of metrics records."""
    losses: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    rows: dict[int, dict[str, Any]] = defaultdict(dict)
    loss_columns, eval_columns = {}, {}
    for record in sorted(records, key=lambda r: (r.get("step") or 0, r["kind"] != "train")):
        values = _numbers(record)
        if record["kind"] == "train":
            epoch = record["epoch"] + 1  # train lines carry the epoch in progress, 0-based
            for name, value in values.items():
                if name.startswith("loss"):
                    losses[epoch][f"train/{name}"].append(value)
                    loss_columns[f"train/{name}"] = None
            if "lr" in values:
                rows[epoch]["lr"] = values["lr"]
        else:
            epoch = record["epoch"]  # evaluation lines carry the epochs completed
            for name, value in values.items():
                rows[epoch][f"{record['kind']}/{name}"] = value
                eval_columns[f"{record['kind']}/{name}"] = None
        rows[epoch]["step"] = max(rows[epoch].get("step", 0), int(record.get("step") or 0))
    for epoch, columns in losses.items():
        rows[epoch].update({name: sum(v) / len(v) for name, v in columns.items()})
    ordered = [name for name in sorted(loss_columns, key=lambda n: (n != "train/loss", n))]
    header = ["epoch", "step", *ordered, "lr", *sorted(eval_columns)]
    return header, [{"epoch": epoch, **rows[epoch]} for epoch in sorted(rows) if epoch >= 1]


def write_results_csv(run_dir: str | Path) -> Path | None:
    """Rebuild ``<run_dir>/results.csv`` from ``metrics.jsonl``; None when there is no log yet."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / METRICS_NAME
    if not metrics_path.is_file():
        return None
    header, rows = results_rows(_records(metrics_path))

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=header, restval="")
            writer.writeheader()
            writer.writerows(rows)

    return atomic_write(run_dir / RESULTS_NAME, write)
