"""qkern_train: a from-scratch Llama-family model, HF checkpoint I/O, tokenizers, generation and
QLoRA training on qkern kernels (no transformers at run time).

Names are imported on first use, except ``generate``: the function shares its name with the
submodule ``qkern_train.generate``, and importing it here makes ``qkern_train.generate`` the
function however the submodule is imported later.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> submodule that defines it
_EXPORTS: dict[str, str] = {
    "ModelConfig": "qkern_train.model",
    "Transformer": "qkern_train.model",
    "KVCache": "qkern_train.model",
    "build_model": "qkern_train.model",
    "load_model": "qkern_train.checkpoint",
    "save_model": "qkern_train.checkpoint",
    "save_quantized": "qkern_train.checkpoint",
    "load_tokenizer": "qkern_train.tokenizer",
    "Tokenizer": "qkern_train.tokenizer",
    "GenerationConfig": "qkern_train.generate",
    "LoraConfig": "qkern_train.lora",
    "apply_lora": "qkern_train.lora",
    "save_adapter": "qkern_train.lora",
    "load_adapter": "qkern_train.lora",
    "merge_and_save": "qkern_train.lora",
    "Trainer": "qkern_train.trainer",
    "run_sft": "qkern_train.trainer",
    "load_config": "qkern_train.config",
}

__all__ = [*_EXPORTS, "generate"]


from qkern_train.generate import generate  # noqa: E402


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qkern_train' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
