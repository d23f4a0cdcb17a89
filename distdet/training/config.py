"""Every training flag in one dataclass, the argparse parser built from it, and config files.

Each :class:`TrainConfig` field is one command-line flag (``--field-name``), with its help
text and choices in the field's metadata, so the flags, their defaults and ``--help`` can never
drift apart. ``--config FILE`` (YAML ``.yaml/.yml`` or TOML ``.toml``) supplies values by the
same names (dashes or underscores); flags given on the command line override the file. A
renamed option keeps its old spelling as a hidden alias, on the command line and in files
(``--split`` for ``--split-scheme``). The class list may also be given there as ``classes:``
and as a list of names; ``--min-size`` as a comma list on the command line (``384,448,512``)
and as a list or a single number in a file.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distdet.data.class_list import parse_class_names
from distdet.data.splits import SPLIT_NAMES
from distdet.data.presets import PRESETS
from distdet.modeling.names import MODEL_NAMES
from distdet.runtime.options import (
    DEFAULT_DIST_TIMEOUT_S,
    MIXED_PRECISION_CHOICES,
    MALLOC_MODES,
    TF32_MODES,
    add_hidden_alias,
    old_spelling,
)
from distdet.training.tracker_choice import REPORT_TO, resolve_trackers

OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("multistep", "cosine")


def _flag(help: str, *, group: str, choices: Sequence[Any] | None = None, metavar: str | None = None,
          item_type: type | None = None, comma_list: bool = False, old_name: str | None = None,
          default: Any = dataclasses.MISSING, default_factory: Any = dataclasses.MISSING) -> Any:
    """A field's metadata; ``old_name``: the option's former name, still accepted (hidden).

    A list field (``item_type``) takes its items as separate arguments, or with ``comma_list``
    as one comma-separated argument."""
    meta = {"help": help, "group": group, "choices": choices, "metavar": metavar, "item_type": item_type,
            "comma_list": comma_list, "old_name": old_name}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Resolved training options; see ``python train.py --help`` for each one's meaning."""

    # -- data ---------------------------------------------------------------------------------
    data_dir: str | None = _flag(
        "dataset folder: a COCO instances JSON (annotations.json or instances_*.json) with its images, "
        "or the VOC layout (images/, annotations/); default: the synthetic face-mask set, generated "
        "once into the cache", group="data", metavar="DIR", default=None)
    annotations: str | None = _flag(
        "the COCO instances JSON of --data-dir, when it is not DIR/annotations.json or DIR/instances_*.json",
        group="data", metavar="FILE", default=None)
    class_names: str | None = _flag(
        "comma-separated class names in label order (labels 1..K; 0 is background); default: the COCO "
        "categories, else the face-mask table when every VOC name is a face-mask class, else the VOC "
        "names sorted", group="data", metavar="A,B,C", default=None)
    lenient: bool = _flag("skip images whose annotation or image file has a problem (each skip is logged and "
                          "counted) instead of stopping with every problem listed", group="data", default=False)
    split_scheme: str = _flag("how to split train/test when no --split-manifest is given", group="data",
                              choices=SPLIT_NAMES, old_name="split", default="tutorial")
    test_fraction: float = _flag("--split-scheme stratified: fraction of the images held out for testing", group="data",
                                 default=0.2)
    split_manifest: str | None = _flag(
        "reuse the train/test split of this manifest JSON (e.g. split.json of an earlier run)",
        group="data", metavar="FILE", default=None)
    val_fraction: float = _flag(
        "carve this fraction of the training images out as a validation set: evaluation during "
        "training and model selection use it; the test split is scored once at the end "
        "(0 = evaluate on the test split during training)", group="data", default=0.0)
    augment: str = _flag("augmentation preset for training images", group="data", choices=PRESETS,
                         default="hflip")
    workers: int = _flag("DataLoader worker processes per training process (0 = load in the main process)",
                         group="data", default=2)
    aspect_ratio_group_factor: int = _flag(
        "batch images of similar aspect ratio together (2k+1 ratio bins, as torchvision's "
        "references do); -1 = off", group="data", default=-1)
    repeat_factor_threshold: float | None = _flag(
        "repeat-factor sampling (LVIS): a class in a fraction f < T of the training images gets factor "
        "sqrt(T / f), an image the largest of its classes', rounded stochastically each epoch; "
        "T in (0, 1], e.g. 0.5; default off", group="data", metavar="T", default=None)

    # -- model --------------------------------------------------------------------------------
    model: str = _flag("detector architecture", group="model", choices=MODEL_NAMES,
                       default="fasterrcnn_resnet50_fpn")
    weights: str = _flag("initial detector weights: coco (torchvision's), none (random) or a .pt file",
                         group="model", metavar="coco|none|PATH", default="coco")
    backbone_weights: str = _flag("initial backbone weights when --weights none: imagenet, none or a file",
                                  group="model", metavar="imagenet|none|PATH", default="none")
    min_size: list[int] = _flag(
        "images are resized so their short side is this many pixels; a comma list (384,448,512) trains "
        "each batch at one of them, drawn from (--seed, epoch, batch)", group="model", item_type=int,
        comma_list=True, metavar="N[,N...]", default_factory=lambda: [800])
    max_size: int = _flag("... and their long side at most this many pixels", group="model", default=1333)
    eval_min_size: int | None = _flag(
        "short side for evaluation (validation, the test evaluation) and for the saved model (evaluate, "
        "predict, export); default: the largest --min-size", group="model", metavar="N", default=None)
    trainable_backbone_layers: int | None = _flag(
        "number of trainable backbone stages (0-5, pretrained weights only; default: torchvision's)",
        group="model", default=None)
    box_batch_size_per_image: int = _flag(
        "region proposals sampled per image for the box head's loss (torchvision's default 512; "
        "smaller is much faster on CPU)", group="model", default=512)
    rpn_batch_size_per_image: int = _flag("anchors sampled per image for the RPN's loss", group="model",
                                          default=256)

    # -- optimisation -------------------------------------------------------------------------
    optimizer: str = _flag("optimizer", group="optim", choices=OPTIMIZERS, default="sgd")
    lr: float = _flag("learning rate for the GLOBAL batch (batch-size x processes x grad-accum-steps)",
                      group="optim", default=0.005)
    scale_lr_from_batch: int | None = _flag(
        "treat --lr as tuned for this global batch size and scale it linearly to the actual global "
        "batch (lr x global / REF)", group="optim", metavar="REF", default=None)
    momentum: float = _flag("SGD momentum", group="optim", default=0.9)
    weight_decay: float = _flag("weight decay (SGD: L2 term; AdamW: decoupled)", group="optim", default=5e-4)
    no_decay_norm_bias: bool = _flag("no weight decay on normalisation weights and biases", group="optim",
                                     default=False)
    lr_schedule: str = _flag("learning-rate schedule after warmup", group="optim", choices=LR_SCHEDULES,
                             default="multistep")
    lr_milestones: list[int] = _flag("multistep: epochs at which the rate is multiplied by --lr-gamma "
                                     "(none = constant rate)", group="optim", item_type=int,
                                     metavar="EPOCH", default_factory=list)
    lr_gamma: float = _flag("multistep: factor applied at each milestone", group="optim", default=0.1)
    warmup_steps: int = _flag(
        "linear warmup length in optimizer steps; -1 = the tutorial's min(1000, steps in one epoch - 1); "
        "0 = none", group="optim", default=-1)
    warmup_factor: float = _flag("warmup starts at lr x this factor", group="optim", default=0.001)
    ema_decay: float | None = _flag(
        "keep an exponential moving average of the weights, updated after every applied optimizer step with "
        "decay D x (1 - exp(-updates / --ema-tau)), 0 < D < 1 (e.g. 0.9998; 0.99 for runs of ~1000 updates); "
        "validation, best/, the test evaluation and model.pt then use the averaged weights (default: off)",
        group="optim", metavar="D", default=None)
    ema_tau: float = _flag(
        "--ema-decay's warm-up time constant in optimizer updates (2000 as in Ultralytics; take about a tenth "
        "of the run's updates for short runs)", group="optim", metavar="UPDATES", default=2000.0)

    # -- training loop ------------------------------------------------------------------------
    epochs: int = _flag("number of epochs", group="train", default=30)
    batch_size: int = _flag("images per batch per process", group="train", default=4)
    grad_accum_steps: int = _flag("accumulate gradients over this many batches per optimizer step",
                                  group="train", default=1)
    clip_grad_norm: float = _flag("clip the global gradient norm to this value (0 = no clipping)",
                                  group="train", default=0.0)
    mixed_precision: str | None = _flag(
        "mixed precision (default: the launcher's config, else no); fp16 needs a CUDA GPU, bf16 runs on "
        "CPU and recent GPUs", group="train", choices=MIXED_PRECISION_CHOICES, default=None)
    tf32: str = _flag(
        "TF32 on CUDA: torch = PyTorch's default (TF32 convolutions, IEEE fp32 matmuls), on = TF32 for "
        "both, off = IEEE fp32 for both; no effect on CPU", group="train", choices=TF32_MODES, default="torch")
    malloc: str = _flag(
        "CPU memory: keep = glibc reuses freed blocks instead of returning them to the kernel (measured "
        "1.4x faster CPU steps, fewer page faults; the process keeps its peak heap), system = the C "
        "library's defaults", group="train", choices=MALLOC_MODES, default="keep")
    max_steps: int = _flag("stop (with a checkpoint) after this many optimizer steps in total; 0 = no limit",
                           group="train", default=0)
    max_bad_steps: int = _flag("stop with an error after this many consecutive steps with a non-finite loss",
                               group="train", default=5)
    seed: int = _flag("random seed (model init, data order, augmentation)", group="train", default=42)
    deterministic: bool = _flag("deterministic algorithms (bit-identical reruns and resumes on CPU; slower)",
                                group="train", default=False)
    cpu: bool = _flag("train on CPU even when a GPU is available", group="train", default=False)

    # -- run folder and checkpoints -------------------------------------------------------------
    output_dir: str | None = _flag("run folder (default: runs/<timestamp>)", group="run", metavar="DIR",
                                   default=None)
    checkpoint_every: int = _flag("also checkpoint every this many optimizer steps (0 = only at epoch ends)",
                                  group="run", default=0)
    keep_checkpoints: int = _flag("keep only the newest this many checkpoints", group="run", default=3)
    resume: str = _flag("resume: none, auto (latest complete checkpoint of --output-dir, if any) or a "
                        "checkpoint/run folder", group="run", metavar="none|auto|PATH", default="none")

    # -- evaluation ---------------------------------------------------------------------------------
    eval_every: int = _flag("evaluate every this many epochs (0 = not during training)", group="eval",
                            default=1)
    eval_batch_size: int = _flag("images per batch per process during evaluation", group="eval", default=4)
    best_metric: str = _flag("metric (higher is better) that picks the best checkpoint", group="eval",
                             default="voc/mAP50")
    final_eval: bool = _flag("score the final model on the test split at the end", group="eval", default=True)

    # -- logging ------------------------------------------------------------------------------------
    log_every: int = _flag("log metrics every this many optimizer steps", group="log", default=10)
    report_to: str = _flag(
        "experiment trackers (Accelerate's) that get the metrics.jsonl scalars and the run config: "
        "all = every installed one; wandb and mlflow come with pip install 'distdet[trackers]'",
        group="log", choices=REPORT_TO, default="tensorboard")
    tensorboard: bool = _flag("--no-tensorboard leaves TensorBoard out of --report-to (older spelling of "
                              "--report-to none)", group="log", default=True)
    progress: bool = _flag("show a progress bar", group="log", default=True)
    pictures: bool = _flag("draw plots/labels.png (label statistics of the training images) and "
                           "train_batches.png (the first augmented batches) before the first step",
                           group="log", default=True)

    # -- distributed and cluster --------------------------------------------------------------------
    dist_timeout: float = _flag("seconds a collective waits for the other ranks before failing",
                                group="dist", default=DEFAULT_DIST_TIMEOUT_S)
    requeue_on_signal: bool = _flag("under Slurm, requeue the job after a SIGUSR1/SIGTERM checkpoint",
                                    group="dist", default=True)

    # -- testing aids -----------------------------------------------------------------------------
    debug_nan_at_step: list[int] = _flag(
        "TESTING AID: make the loss NaN at these global optimizer steps (0-based)", group="debug",
        item_type=int, metavar="STEP", default_factory=list)
    debug_nan_rank: int = _flag("TESTING AID: poison the loss only on this rank (-1 = every rank)", group="debug",
                                default=-1)
    debug_record_samples: bool = _flag(
        "TESTING AID: each rank writes the image ids it trained on to debug/samples_rank<R>.jsonl",
        group="debug", default=False)

    config: str | None = _flag("YAML or TOML file of option values (flags given here override it)",
                               group="config", metavar="FILE", default=None)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


GROUP_TITLES = {
    "config": "configuration file",
    "data": "data",
    "model": "model",
    "optim": "optimisation",
    "train": "training loop",
    "run": "run folder and checkpoints",
    "eval": "evaluation",
    "log": "logging",
    "dist": "distributed and cluster",
    "debug": "testing aids",
}


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _scalar_type(f: dataclasses.Field) -> type:
    text = str(f.type)
    for name, kind in (("bool", bool), ("int", int), ("float", float)):
        if text.startswith(name):
            return kind
    return str


def _parse_kwargs(f: dataclasses.Field) -> dict[str, Any]:
    """How argparse reads the field's value (type, nargs or action, choices)."""
    meta = f.metadata
    kind = _scalar_type(f)
    if meta["comma_list"]:
        return {"type": _comma_list_argument(meta["item_type"])}
    if meta["item_type"] is not None:
        return {"nargs": "*", "type": meta["item_type"]}
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction}
    return {"type": kind, **({"choices": list(meta["choices"])} if meta["choices"] is not None else {})}


def _comma_list(text: str, item_type: type) -> list[Any]:
    """``"384,448"`` as ``[384, 448]``; ValueError naming the item that is not an ``item_type``."""
    items = [item.strip() for item in text.split(",")]
    for item in items:
        try:
            item_type(item)
        except ValueError:
            raise ValueError(f"{item!r} is not {'an integer' if item_type is int else item_type.__name__}") from None
    return [item_type(item) for item in items]


def _comma_list_argument(item_type: type) -> Any:
    """The argparse ``type`` of a comma-list flag: its errors become the flag's usage error (exit 2)."""
    def parse(text: str) -> list[Any]:
        try:
            return _comma_list(text, item_type)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None

    return parse


#: ``--min-size``'s argparse type, for scripts that take sizes to pass on to train.py
size_list_argument = _comma_list_argument(int)


def comma_text(values: Sequence[Any]) -> str:
    """A comma-list flag's value as its command-line text (``[384, 448]`` -> ``"384,448"``)."""
    return ",".join(map(str, values))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per :class:`TrainConfig` field to ``parser`` (plus hidden old spellings).

    The flags have no argparse default: the parsed namespace holds only the options given on
    the command line, which is how :func:`config_from_namespace` lets them override a
    ``--config`` file. ``--help`` shows each field's default in its text.
    """
    groups = {key: parser.add_argument_group(title) for key, title in GROUP_TITLES.items()}
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = comma_text(default) if meta["comma_list"] else default
        help_text = meta["help"] + (f" (default: {shown})" if default not in (None, []) else "")
        if meta["old_name"] is not None:
            help_text = old_spelling(help_text, flag_name(meta["old_name"]))
        kwargs = _parse_kwargs(f)
        metavar = meta["metavar"] or ("VALUE" if meta["item_type"] is not None else None)
        if metavar is not None and "action" not in kwargs:
            kwargs["metavar"] = metavar
        group = groups[meta["group"]]
        group.add_argument(flag_name(f.name), dest=f.name, default=argparse.SUPPRESS,
                           help=help_text.replace("%", "%%"), **kwargs)
        if meta["old_name"] is not None:
            add_hidden_alias(group, flag_name(meta["old_name"]), f.name, **kwargs)


def build_parser(prog: str = "train.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        allow_abbrev=False,
        description="Fine-tune a torchvision Faster R-CNN on face-mask VOC data, on one process or "
        "many (accelerate launch). CPU, 2 processes: accelerate launch --config_file "
        "launch/accelerate/cpu_2proc.yaml train.py ...",
    )
    add_arguments(parser)
    return parser


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or TOML options file into ``{field_name: value}``; clear errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            data = tomllib.loads(path.read_text())
        elif suffix in (".yaml", ".yml"):
            data = yaml.safe_load(path.read_text())
        else:
            raise ValueError(f"config file {path}: unknown format {suffix!r} (use .yaml, .yml or .toml)")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"config file {path} is not valid {suffix[1:].upper()}: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of option names to values")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    renamed = {f.metadata["old_name"]: f.name for f in fields.values() if f.metadata["old_name"]}
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        name = renamed.get(name, name)
        name = "class_names" if name == "classes" else name
        if name == "class_names" and isinstance(value, list):
            value = ",".join(parse_class_names(value, f"config file {path}: option {key!r}"))
        if name not in fields or name == "config":
            raise ValueError(f"config file {path}: unknown option {key!r}")
        values[name] = _coerce(fields[name], value, f"config file {path}: option {key!r}")
    return values


def _coerce(f: dataclasses.Field, value: Any, where: str) -> Any:
    meta = f.metadata
    if value is None:
        if f.default is None:
            return None
        raise ValueError(f"{where} must not be empty")
    if meta["item_type"] is not None:
        items = value if isinstance(value, list) else [value]
        if meta["comma_list"] and isinstance(value, str):
            try:
                return _comma_list(value, meta["item_type"])
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from exc
        if any(isinstance(item, bool) or (isinstance(item, float) and not item.is_integer()) for item in items):
            raise ValueError(f"{where}: expected a list of {meta['item_type'].__name__}, got {value!r}")
        try:
            return [meta["item_type"](item) for item in items]
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: expected a list of {meta['item_type'].__name__}, got {value!r}") from exc
    kind = _scalar_type(f)
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    if isinstance(value, (bool, list, dict)):
        raise ValueError(f"{where}: expected {kind.__name__}, got {value!r}")
    try:
        # YAML reads 5e-3 as a string; going through str keeps both formats equal.
        converted = kind(str(value)) if kind is not str else str(value)
    except ValueError as exc:
        raise ValueError(f"{where}: expected {kind.__name__}, got {value!r}") from exc
    if kind is int and isinstance(value, float) and value != int(value):
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    if meta["choices"] is not None and converted not in meta["choices"]:
        raise ValueError(f"{where}: {converted!r} is not one of {', '.join(map(str, meta['choices']))}")
    return converted


def config_from_namespace(args: argparse.Namespace) -> TrainConfig:
    """Build a validated :class:`TrainConfig` from flags parsed by a parser of :func:`add_arguments`.

    Each option takes, in order of precedence, the value given on the command line (present in
    ``args``), the ``--config`` file's value, the field's default.
    """
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {name: value for name, value in vars(args).items() if name in names}
    values = read_config_file(given["config"]) if given.get("config") else {}
    cfg = TrainConfig(**{**values, **given})
    validate(cfg)
    return cfg


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """Parse ``argv`` (default: sys.argv[1:]) into a validated :class:`TrainConfig`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return config_from_namespace(args)
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


#: The largest float32: a larger step size makes torch's optimizers fail with a traceback.
FLOAT32_MAX = 3.4028234663852886e38


def validate(cfg: TrainConfig) -> None:
    """Raise ValueError naming the flag for values no training run can use (NaN and infinity included)."""
    for name, value in cfg.to_dict().items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{flag_name(name)} must be a finite number, got {value}")
    positive = ("box_batch_size_per_image", "rpn_batch_size_per_image", "epochs", "batch_size", "grad_accum_steps", "eval_batch_size", "log_every", "keep_checkpoints",
                "max_bad_steps", "max_size")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ValueError(f"{flag_name(name)} must be at least 1, got {getattr(cfg, name)}")
    non_negative = ("workers", "checkpoint_every", "eval_every", "max_steps", "clip_grad_norm", "weight_decay",
                    "momentum")
    for name in non_negative:
        if getattr(cfg, name) < 0:
            raise ValueError(f"{flag_name(name)} must not be negative, got {getattr(cfg, name)}")
    if not 0 < cfg.lr <= FLOAT32_MAX:
        raise ValueError(f"--lr must be positive and at most {FLOAT32_MAX:.3g} (the optimizer's float32 step), "
                         f"got {cfg.lr}")
    if cfg.class_names is not None:
        parse_class_names(cfg.class_names)  # ClassListError (a ValueError) names --class-names
    if not 0.0 < cfg.test_fraction < 1.0:
        raise ValueError(f"--test-fraction must be in (0, 1), got {cfg.test_fraction}")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.scale_lr_from_batch is not None and cfg.scale_lr_from_batch < 1:
        raise ValueError(f"--scale-lr-from-batch must be a positive batch size, got {cfg.scale_lr_from_batch}")
    if cfg.warmup_steps < -1:
        raise ValueError(f"--warmup-steps must be -1 (auto), 0 or positive, got {cfg.warmup_steps}")
    if not 0.0 < cfg.warmup_factor <= 1.0:
        raise ValueError(f"--warmup-factor must be in (0, 1], got {cfg.warmup_factor}")
    if cfg.ema_decay is not None and not 0.0 < cfg.ema_decay < 1.0:
        raise ValueError(f"--ema-decay must be in (0, 1), got {cfg.ema_decay}")
    if cfg.ema_tau <= 0:
        raise ValueError(f"--ema-tau must be positive, got {cfg.ema_tau}")
    if cfg.dist_timeout <= 0:
        raise ValueError(f"--dist-timeout must be positive, got {cfg.dist_timeout}")
    if cfg.repeat_factor_threshold is not None and not 0.0 < cfg.repeat_factor_threshold <= 1.0:
        raise ValueError(f"--repeat-factor-threshold must be in (0, 1] (a fraction of the training images), "
                         f"got {cfg.repeat_factor_threshold}")
    if cfg.aspect_ratio_group_factor < -1:
        raise ValueError(f"--aspect-ratio-group-factor must be -1 (off) or >= 0, got {cfg.aspect_ratio_group_factor}")
    if sorted(cfg.lr_milestones) != list(cfg.lr_milestones):
        raise ValueError(f"--lr-milestones must be increasing, got {cfg.lr_milestones}")
    _validate_sizes(cfg)
    resolve_trackers(cfg.report_to, cfg.tensorboard)  # a tracker whose package is missing


#: ``--eval-min-size`` may lie at most this factor below the smallest or above the largest
#: ``--min-size``: further away it is a typo (5120 for 512), not an evaluation scale.
EVAL_SIZE_FACTOR = 2


def eval_min_size(cfg: TrainConfig) -> int:
    """The short side evaluation and the saved model use: ``--eval-min-size``, else the largest ``--min-size``."""
    return cfg.eval_min_size if cfg.eval_min_size is not None else max(cfg.min_size)


def _validate_sizes(cfg: TrainConfig) -> None:
    """``--min-size``: distinct positive sizes; ``--eval-min-size`` near them; ``--max-size`` above them all."""
    sizes = list(cfg.min_size)
    listed = comma_text(sizes)
    if not sizes or any(size < 1 for size in sizes):
        raise ValueError(f"--min-size must be one or more positive integers, got {listed or 'none'}")
    repeated = sorted({size for size in sizes if sizes.count(size) > 1})
    if repeated:
        raise ValueError(f"--min-size {listed} lists {', '.join(map(str, repeated))} more than once "
                         f"(each size is drawn equally often)")
    if cfg.eval_min_size is not None:
        low, high = math.ceil(min(sizes) / EVAL_SIZE_FACTOR), max(sizes) * EVAL_SIZE_FACTOR
        if not low <= cfg.eval_min_size <= high:
            raise ValueError(f"--eval-min-size must be in [{low}, {high}] (within a factor {EVAL_SIZE_FACTOR} of "
                             f"--min-size {listed}), got {cfg.eval_min_size}")
    largest = max(sizes + [eval_min_size(cfg)])
    if cfg.max_size < largest:
        given = f"--min-size {listed}" + (f", --eval-min-size {cfg.eval_min_size}" if cfg.eval_min_size else "")
        raise ValueError(f"--max-size {cfg.max_size} is below the short side {largest} ({given}): it must be at "
                         f"least the largest of them")
