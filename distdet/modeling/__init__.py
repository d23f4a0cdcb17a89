"""Models: building detectors by name (:mod:`.models`), finding initial weights offline
(:mod:`.weights`), saving and reloading a trained detector with its card (:mod:`.model_card`),
and the backbones torchvision does not ship (:mod:`.backbones`)."""
