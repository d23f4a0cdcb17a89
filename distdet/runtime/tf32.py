"""TF32 for fp32 matmuls and convolutions on CUDA (``--tf32``).

PyTorch's own default (``--tf32 torch``) runs fp32 convolutions in TF32 through cuDNN and fp32
matmuls in full IEEE fp32. ``on`` lets both use TF32 (Ampere and later: the fp32 rows of
``benchmarks/gpu_check.py`` measure the difference); ``off`` keeps both in IEEE fp32. The
distdet default stays ``torch`` until that check has been run on a GPU. On CPU the setting
changes nothing.
"""
from __future__ import annotations

from distdet.runtime.options import TF32_MODES


def apply_tf32(mode: str) -> None:
    """Set the process-wide TF32 switches for ``mode`` (one of :data:`TF32_MODES`)."""
    if mode not in TF32_MODES:
        raise ValueError(f"--tf32 must be one of {', '.join(TF32_MODES)}, got {mode!r}")
    if mode == "torch":
        return
    import torch  # here, not at the top: the flag parsers take TF32_MODES from options.py, torch-free

    precision = "tf32" if mode == "on" else "ieee"
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9: mixing in the old API raises
        torch.backends.cuda.matmul.fp32_precision = precision
        torch.backends.cudnn.conv.fp32_precision = precision
    else:
        torch.backends.cuda.matmul.allow_tf32 = mode == "on"
        torch.backends.cudnn.allow_tf32 = mode == "on"
