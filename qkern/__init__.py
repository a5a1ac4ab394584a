"""qkern: Triton kernels for QLoRA training.

Every op has a pure-PyTorch reference (``<op>_ref``, the CPU path and the test oracle) and a
Triton kernel for CUDA tensors; the public functions below dispatch on the tensors' device
(see :mod:`qkern._backend`).

The submodules are imported here, eagerly, on purpose: several of them share their name with the
function they define (``qkern.cross_entropy``, ``qkern.rms_norm``, ``qkern.swiglu``), and
binding the functions after the imports is what keeps ``qkern.cross_entropy`` the function
however the submodule is imported later. The Triton interpreter (``TRITON_INTERPRET=1``) must
therefore be chosen before ``import qkern``.
"""

from __future__ import annotations

from qkern._backend import backend, get_backend, set_backend
from qkern.attention import flash_attention
from qkern.cross_entropy import cross_entropy, fused_linear_cross_entropy
from qkern.fused_lora import lora_mlp, lora_qkv
from qkern.nf4 import QuantState, dequantize_4bit, quantize_4bit
from qkern.optim8bit import AdamW8bit
from qkern.qlora import QLoRALinear, nf4_matmul, qlora_linear
from qkern.rms_norm import RMSNorm, rms_norm
from qkern.rope import apply_rope, rope_cos_sin, rope_inv_freq
from qkern.swiglu import swiglu

__version__ = "0.1.0"

__all__ = [
    "backend",
    "get_backend",
    "set_backend",
    # NF4 / FP4 weight format (bitsandbytes-compatible)
    "QuantState",
    "quantize_4bit",
    "dequantize_4bit",
    # QLoRA linear and the fused NF4 matmul for small M
    "qlora_linear",
    "nf4_matmul",
    "QLoRALinear",
    # fused LoRA blocks
    "lora_mlp",
    "lora_qkv",
    # row and elementwise ops
    "rms_norm",
    "RMSNorm",
    "apply_rope",
    "rope_cos_sin",
    "rope_inv_freq",
    "swiglu",
    # attention
    "flash_attention",
    # losses
    "cross_entropy",
    "fused_linear_cross_entropy",
    # optimizers
    "AdamW8bit",
]
