"""``train.py`` with a record of every batch the detector's transform hands to the backbone.

    python tests/support/size_probe.py RECORD.jsonl [train.py flags]

A global forward hook on every ``GeneralizedRCNNTransform`` (torchvision's, or a subclass)
appends one line per forward call to ``RECORD.jsonl`` (``RECORD.rank<R>.jsonl`` under a
launcher that sets ``RANK``): ``training`` (the module's mode),
``image_sizes`` (each image's resized ``[height, width]``) and ``batch_shape`` (the padded
tensor the backbone receives). The training itself is ``distdet.commands.train.main``,
unchanged, so the sizes are those of the real code path.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from distdet.commands.train import main as train_main


def main(argv: list[str]) -> int:
    path = Path(argv[0])
    if "RANK" in os.environ:
        path = path.with_suffix(f".rank{os.environ['RANK']}{path.suffix}")
    record = open(path, "a")

    def note(module: torch.nn.Module, inputs, output) -> None:
        if isinstance(module, GeneralizedRCNNTransform):
            image_list = output[0]
            record.write(json.dumps({"training": module.training,
                                     "image_sizes": [list(size) for size in image_list.image_sizes],
                                     "batch_shape": list(image_list.tensors.shape)}) + "\n")

    handle = torch.nn.modules.module.register_module_forward_hook(note)
    try:
        return train_main(argv[1:])
    finally:
        handle.remove()
        record.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
