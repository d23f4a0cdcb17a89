"""Which experiment trackers a run reports to (``--report-to``); torch-free, for the flag parser.

The trackers themselves are attached in :mod:`distdet.training.run_logging`.
"""
from __future__ import annotations

import importlib.util

#: ``--report-to`` values: one tracker, every installed one, or none.
REPORT_TO = ("tensorboard", "wandb", "mlflow", "all", "none")
#: The module each tracker needs, and the pip package that provides it.
TRACKER_MODULES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
                   "mlflow": ("mlflow", "mlflow-skinny")}


def resolve_trackers(report_to: str, tensorboard: bool = True) -> list[str]:
    """The trackers a run reports to: ``report_to`` (a :data:`REPORT_TO` value) without
    TensorBoard when ``tensorboard`` is False (the older ``--no-tensorboard`` flag).

    ``all`` means every tracker whose package is installed (as Accelerate's ``log_with="all"``);
    a tracker named on its own whose package is missing is a ValueError naming the flag and the
    package, because Accelerate would drop it silently.
    """
    if report_to not in REPORT_TO:
        raise ValueError(f"--report-to must be one of {', '.join(REPORT_TO)}, got {report_to!r}")
    if report_to == "none":
        return []
    installed = [name for name, (module, _) in TRACKER_MODULES.items() if importlib.util.find_spec(module)]
    if report_to == "all":
        names = installed
    elif report_to in installed:
        names = [report_to]
    else:
        raise ValueError(f"--report-to {report_to} needs the {TRACKER_MODULES[report_to][1]} package: "
                         f"pip install 'distdet[trackers]' (or choose another --report-to)")
    return [name for name in names if tensorboard or name != "tensorboard"]
