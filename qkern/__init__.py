"""qkern: Triton kernels for QLoRA training.

Every op has a pure-PyTorch reference (``<op>_ref``, the CPU path and the test oracle) and a
Triton kernel for CUDA tensors; the public functions below dispatch on the tensors' device
(see :mod:`qkern._backend`). Submodules are imported on first use, so ``import qkern`` stays
cheap and does not import Triton until a kernel is needed.
"""

from __future__ import annotations

import importlib
from typing import Any

from qkern._backend import backend, get_backend, set_backend

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS: dict[str, str] = {
    # NF4 / FP4 weight format (bitsandbytes-compatible)
    "QuantState": "qkern.nf4",
    "quantize_4bit": "qkern.nf4",
    "dequantize_4bit": "qkern.nf4",
    # QLoRA linear, fused NF4 matmul for small M
    "qlora_linear": "qkern.qlora",
    "nf4_matmul": "qkern.qlora",
    "QLoRALinear": "qkern.qlora",
    # fused LoRA blocks
    "lora_mlp": "qkern.fused_lora",
    "lora_qkv": "qkern.fused_lora",
    # elementwise / row ops
    "rms_norm": "qkern.rms_norm",
    "RMSNorm": "qkern.rms_norm",
    "apply_rope": "qkern.rope",
    "rope_cos_sin": "qkern.rope",
    "swiglu": "qkern.swiglu",
    # attention
    "flash_attention": "qkern.attention",
    # losses
    "cross_entropy": "qkern.cross_entropy",
    "fused_linear_cross_entropy": "qkern.cross_entropy",
    # optimizers
    "AdamW8bit": "qkern.optim8bit",
}

__all__ = ["backend", "get_backend", "set_backend", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qkern' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
