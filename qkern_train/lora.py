"""LoRA adapters: inject, train, save/load in the HF PEFT format, merge.

A LoRA adapter on a linear layer W [out, in] adds a low-rank update:

    y = x·Wᵀ + s·(dropout(x)·Aᵀ)·Bᵀ,   A [r, in], B [out, r],   s = alpha/r  (rsLoRA: alpha/√r)

B starts at zero, so the adapted model starts exactly at the base model; A starts
Kaiming-uniform with a = √5 (bound 1/√in, PEFT's default) or Gaussian with std 1/r. Only A and B
train (optionally also the embeddings and the LM head, for continued pre-training).

* NF4 projections (:class:`qkern.QLoRALinear`, from ``load_model(load_in_4bit=True)``) carry the
  adapter themselves (``add_adapter``); 16-bit ``nn.Linear`` projections are wrapped in
  :class:`LoRALinear`, which has the same attribute names (``lora_A``, ``lora_B``, ``scaling``,
  ``lora_dropout``, ``r``, ``base_weight``, ``merged_weight``), so the rest of the code treats
  both alike. Initial values are drawn on the CPU from one generator seeded by ``seed``, module
  by module in model order, so a seed gives the same adapter on any device and for both kinds.
* Saved adapters are HF PEFT adapters: ``adapter_config.json`` and ``adapter_model.safetensors``
  with keys ``base_model.model.<HF module path>.lora_A.weight`` (r, in) and ``.lora_B.weight``
  (out, r); trained embeddings / LM head go in as PEFT ``modules_to_save`` tensors
  (``base_model.model.model.embed_tokens.weight``, ``base_model.model.lm_head.weight``).
* Merging computes W + s·B·A in float32 (from the NF4 weights dequantized, or from the original
  16-bit weights when the model was loaded unquantized) and replaces each adapted module by a
  plain ``nn.Linear``; :func:`merge_and_save` then writes a 16-bit HF model directory.

Not supported: DoRA, per-module rank/alpha patterns, LoRA on biases, fan_in_fan_out weights.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from qkern.qlora import init_lora_a

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass
class LoraConfig:
    """Which modules get adapters, their rank and scale, and what else trains."""

    r: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    use_rslora: bool = False  # scale alpha/sqrt(r) instead of alpha/r
    init_lora_weights: str = "kaiming"  # kaiming (PEFT default) or gaussian
    train_embeddings: bool = False  # also train embed_tokens (continued pre-training)
    train_lm_head: bool = False  # also train lm_head (the embedding when tied)
    layers_to_transform: list[int] | None = None  # only these layer indices (None = all)

    def validate(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"lora.r must be a positive integer, got {self.r!r}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("lora.target_modules is empty")
        if self.init_lora_weights not in ("kaiming", "gaussian"):
            raise ValueError(
                f"lora.init_lora_weights must be 'kaiming' or 'gaussian', got "
                f"{self.init_lora_weights!r}"
            )

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoRALinear(nn.Module):
    """A frozen 16-bit (or fp32) linear layer plus a LoRA adapter, in plain PyTorch.

    Keeps the wrapped layer's ``weight`` and ``bias`` as its own (frozen) parameters, so state
    dict names and the checkpoint writer see the same names as for the ``nn.Linear`` it replaces.
    """

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = nn.Parameter(base.weight.detach(), requires_grad=False)
        if base.bias is not None:
            self.bias = nn.Parameter(base.bias.detach(), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.register_parameter("lora_A", None)
        self.register_parameter("lora_B", None)
        self.r = 0
        self.scaling = 0.0
        self.lora_dropout = 0.0

    def add_adapter(
        self,
        r: int,
        lora_alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """Create the adapter (same contract as ``qkern.QLoRALinear.add_adapter``)."""
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be a positive int, got {r!r}")
        a = torch.empty(r, self.in_features, dtype=torch.float32)
        init_lora_a(a, init, generator)
        dev = self.weight.device
        self.lora_A = nn.Parameter(a.to(device=dev, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=dev))
        self.r = r
        self.scaling = float(lora_alpha) / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout = float(dropout)

    def base_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.detach().to(dtype)

    @torch.no_grad()
    def merged_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W + s·B·A computed in float32, returned in ``dtype``."""
        w = self.weight.detach().float().clone()
        if self.r > 0:
            w.addmm_(self.lora_B.float(), self.lora_A.float(), alpha=self.scaling)
        return w.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.r == 0:
            return y
        xd = F.dropout(x, self.lora_dropout, self.training) if self.lora_dropout > 0 else x
        t = F.linear(xd, self.lora_A.to(x.dtype))
        return y + self.scaling * F.linear(t, self.lora_B.to(x.dtype))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, r={self.r}, scaling={self.scaling:g}, "
            f"lora_dropout={self.lora_dropout:g}"
        )


def _is_qlora(m: nn.Module) -> bool:
    import qkern

    return isinstance(m, qkern.QLoRALinear)


def _hf_module_path(name: str) -> str:
    """HF module path of one of our module names: ``lm_head`` stays, the rest gain ``model.``."""
    return name if name == "lm_head" else f"model.{name}"


def _layer_index(name: str) -> int | None:
    m = re.match(r"^layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _matches(name: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):  # PEFT allows a regex over the full module path
        return re.fullmatch(targets, _hf_module_path(name)) is not None
    return name.rsplit(".", 1)[-1] in targets or _hf_module_path(name) in targets


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def adapted_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that carry an adapter (r > 0), by name, in model order."""
    return {
        n: m
        for n, m in model.named_modules()
        if getattr(m, "r", 0) > 0 and getattr(m, "lora_A", None) is not None
    }


def apply_lora(model: nn.Module, cfg: LoraConfig, seed: int = 0) -> list[str]:
    """Freeze the model and add adapters to the target modules; returns the adapted names.

    ``nn.Linear`` targets are replaced by :class:`LoRALinear`; ``QLoRALinear`` targets get
    ``add_adapter``. A is drawn from a CPU generator seeded with ``seed`` (module order), B = 0.
    """
    cfg.validate()
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(int(seed))
    names = []
    linear_names = []
    for name, module in list(model.named_modules()):
        is_linear = isinstance(module, (nn.Linear, LoRALinear)) or _is_qlora(module)
        if not is_linear or name == "lm_head":
            continue
        linear_names.append(name.rsplit(".", 1)[-1])
        if not _matches(name, cfg.target_modules):
            continue
        layer = _layer_index(name)
        if cfg.layers_to_transform is not None and layer not in cfg.layers_to_transform:
            continue
        if not _is_qlora(module):
            if isinstance(module, LoRALinear):
                raise ValueError(f"{name} already has a LoRA adapter")
            module = LoRALinear(module)
            _replace_module(model, name, module)
        elif module.r > 0:
            raise ValueError(f"{name} already has a LoRA adapter")
        # A is drawn from the CPU generator, so the values depend neither on the device nor on
        # the module kind
        module.add_adapter(
            cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora, cfg.init_lora_weights, gen
        )
        names.append(name)
    if not names:
        available = sorted(set(linear_names))
        raise ValueError(
            f"lora.target_modules {cfg.target_modules} matched no module; linear modules: "
            f"{available}"
        )
    full = []
    if cfg.train_embeddings:
        full.append(model.embed_tokens.weight)
    if cfg.train_lm_head:
        head = getattr(model, "lm_head", None)
        full.append((model.embed_tokens if head is None else head).weight)
    for w in full:
        # a fully trained weight keeps a float32 master copy, as the adapters do: Adam updates of
        # ~lr = 2e-5 relative to weights of ~1e-2 are far below bf16's 2^-8 resolution and would
        # round away. The model casts it to its compute dtype where it is used.
        if w.dtype in (torch.float16, torch.bfloat16):
            w.data = w.data.float()
        w.requires_grad_(True)
    return names


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter matrices (lora_A, lora_B) of every adapted module."""
    out = []
    for m in adapted_modules(model).values():
        out += [m.lora_A, m.lora_B]
    return out


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter that requires grad, by name (adapters plus any unfrozen weights)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _modules_to_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """Fully trained non-adapter weights (embeddings / LM head) as PEFT modules_to_save tensors."""
    out = {}
    if model.embed_tokens.weight.requires_grad:
        out["embed_tokens"] = model.embed_tokens.weight
    head = getattr(model, "lm_head", None)
    if head is not None and head.weight.requires_grad:
        out["lm_head"] = head.weight
    return out


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The PEFT-named tensors of the adapter (CPU, contiguous, in their training dtype)."""
    sd: dict[str, torch.Tensor] = {}
    for name, m in adapted_modules(model).items():
        key = PEFT_PREFIX + _hf_module_path(name)
        sd[key + ".lora_A.weight"] = m.lora_A.detach().cpu().contiguous()
        sd[key + ".lora_B.weight"] = m.lora_B.detach().cpu().contiguous()
    for name, w in _modules_to_save(model).items():
        sd[PEFT_PREFIX + _hf_module_path(name) + ".weight"] = w.detach().cpu().contiguous()
    return sd


def peft_config_dict(cfg: LoraConfig, model: nn.Module, base_path: str | None = None) -> dict:
    """``adapter_config.json`` content, with the keys HF PEFT writes for a LoRA adapter."""
    modules_to_save = sorted(_modules_to_save(model)) or None
    targets = cfg.target_modules
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": targets if isinstance(targets, str) else sorted(set(targets)),
        "bias": "none",
        "use_rslora": cfg.use_rslora,
        "use_dora": False,
        "fan_in_fan_out": False,
        "base_model_name_or_path": base_path,
        "inference_mode": True,
        "init_lora_weights": True if cfg.init_lora_weights == "kaiming" else "gaussian",
        "modules_to_save": modules_to_save,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": cfg.layers_to_transform,
        "layers_pattern": None,
        "exclude_modules": None,
        "lora_bias": False,
        "revision": None,
    }


def lora_config_from_model(model: nn.Module) -> LoraConfig:
    """A :class:`LoraConfig` describing the adapters a model carries (for saving them when the
    original config is not at hand; alpha is expressed without rsLoRA, the same scale)."""
    mods = adapted_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA adapter")
    first = next(iter(mods.values()))
    layers = sorted({i for n in mods if (i := _layer_index(n)) is not None})
    all_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    return LoraConfig(
        r=first.r,
        alpha=first.scaling * first.r,
        dropout=first.lora_dropout,
        target_modules=sorted({n.rsplit(".", 1)[-1] for n in mods}),
        train_embeddings=model.embed_tokens.weight.requires_grad,
        train_lm_head=getattr(model, "lm_head", None) is not None
        and model.lm_head.weight.requires_grad,
        layers_to_transform=None if all_layers is None or len(layers) == all_layers else layers,
    )


def save_adapter(
    model: nn.Module,
    directory: str | Path,
    cfg: LoraConfig | None = None,
    base_path: str | None = None,
) -> Path:
    """Write the adapter as an HF PEFT adapter directory; returns the directory.

    ``cfg`` must describe the model's adapters (rank and scale are checked); None derives it
    from the model.
    """
    sd = adapter_state_dict(model)
    if not sd:
        raise ValueError("the model has no LoRA adapter to save (call apply_lora first)")
    cfg = cfg or lora_config_from_model(model)
    for name, m in adapted_modules(model).items():
        if m.r != cfg.r or not math.isclose(m.scaling, cfg.scaling, rel_tol=1e-6):
            raise ValueError(
                f"LoRA config (r={cfg.r}, scale {cfg.scaling:g}) does not describe the adapter "
                f"of {name} (r={m.r}, scale {m.scaling:g})"
            )
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(d / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    conf = peft_config_dict(cfg, model, None if base_path is None else str(base_path))
    (d / ADAPTER_CONFIG).write_text(json.dumps(conf, indent=2) + "\n")
    return d


def read_adapter_config(directory: str | Path) -> LoraConfig:
    """The :class:`LoraConfig` of a PEFT adapter directory (unsupported features refused)."""
    d = Path(directory)
    path = d / ADAPTER_CONFIG
    if not d.is_dir():
        raise FileNotFoundError(f"adapter directory {d} does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"{d} has no {ADAPTER_CONFIG} (not a PEFT adapter directory)")
    try:
        c: dict[str, Any] = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if c.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {c.get('peft_type')!r} is not LORA")
    unsupported = [
        ("use_dora", bool(c.get("use_dora"))),
        ("rank_pattern", bool(c.get("rank_pattern"))),
        ("alpha_pattern", bool(c.get("alpha_pattern"))),
        ("fan_in_fan_out", bool(c.get("fan_in_fan_out"))),
        ("bias", c.get("bias", "none") != "none"),
        ("lora_bias", bool(c.get("lora_bias"))),
        ("layers_pattern", bool(c.get("layers_pattern"))),
    ]
    bad = [k for k, is_set in unsupported if is_set]
    if bad:
        raise ValueError(f"{path}: unsupported adapter features: {', '.join(bad)}")
    init = c.get("init_lora_weights", True)
    layers = c.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]
    modules_to_save = c.get("modules_to_save") or []
    return LoraConfig(
        r=int(c["r"]),
        alpha=float(c.get("lora_alpha", c["r"])),
        dropout=float(c.get("lora_dropout", 0.0)),
        target_modules=c.get("target_modules") or list(DEFAULT_TARGETS),
        use_rslora=bool(c.get("use_rslora", False)),
        init_lora_weights="gaussian" if init == "gaussian" else "kaiming",
        train_embeddings="embed_tokens" in modules_to_save,
        train_lm_head="lm_head" in modules_to_save,
        layers_to_transform=layers,
    )


def load_adapter(model: nn.Module, directory: str | Path, trainable: bool = False) -> LoraConfig:
    """Load a PEFT adapter into ``model`` (adding adapters first if it has none).

    Every tensor must match a module of the model, with the right shape, and every adapted
    module must receive its A and B. ``trainable=False`` freezes the loaded weights (inference).
    """
    cfg = read_adapter_config(directory)
    path = Path(directory) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no {ADAPTER_WEIGHTS}")
    tensors = load_file(str(path))
    if not adapted_modules(model):
        apply_lora(model, cfg)
    expected = adapter_state_dict(model)
    if cfg.train_embeddings or cfg.train_lm_head:
        for name in ("embed_tokens", "lm_head"):
            key = PEFT_PREFIX + _hf_module_path(name) + ".weight"
            if key in tensors and key not in expected and getattr(model, name, None) is not None:
                expected[key] = getattr(model, name).weight
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"adapter {directory} does not fit this model: missing {missing[:4]}"
            f"{' ...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
            f"{' ...' if len(unexpected) > 4 else ''}"
        )
    params = dict(model.named_parameters())
    by_key = {}
    for name, m in adapted_modules(model).items():
        key = PEFT_PREFIX + _hf_module_path(name)
        by_key[key + ".lora_A.weight"] = m.lora_A
        by_key[key + ".lora_B.weight"] = m.lora_B
    for name in ("embed_tokens", "lm_head"):
        if f"{name}.weight" in params:
            by_key[PEFT_PREFIX + _hf_module_path(name) + ".weight"] = params[f"{name}.weight"]
    with torch.no_grad():
        for key, t in tensors.items():
            p = by_key[key]
            if tuple(p.shape) != tuple(t.shape):
                raise ValueError(
                    f"adapter tensor {key} has shape {tuple(t.shape)}, the model expects "
                    f"{tuple(p.shape)} (different base model or rank?)"
                )
            p.copy_(t.to(p.dtype))
    for key, p in by_key.items():
        if key in tensors:
            p.requires_grad_(trainable)
    return cfg


@torch.no_grad()
def merge_lora(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Fold every adapter into its weight, in place: each adapted module becomes an
    ``nn.Linear`` holding W + s·B·A (computed in float32, stored in ``dtype``, default the
    dtype of the model's embeddings). One module at a time, so the extra memory is one fp32
    weight."""
    dtype = dtype or model.embed_tokens.weight.dtype
    for name, m in adapted_modules(model).items():
        w = m.merged_weight(torch.float32)
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        lin.weight = nn.Parameter(w.to(dtype), requires_grad=False)
        if m.bias is not None:
            lin.bias = nn.Parameter(m.bias.detach().to(dtype), requires_grad=False)
        _replace_module(model, name, lin)
        del w
    return model


def merge_and_save(
    model: nn.Module,
    out_dir: str | Path,
    dtype: torch.dtype | str = torch.bfloat16,
    tokenizer_dir: str | Path | None = None,
) -> Path:
    """Merge the adapters into the model (in place) and write a 16-bit HF model directory.

    The merge runs in float32 and each merged weight is rounded once, to ``dtype``. Tokenizer
    files of ``tokenizer_dir`` (the base model's directory) are copied alongside.
    """
    from qkern_train.checkpoint import parse_dtype, save_model

    dtype = parse_dtype(dtype)
    if not adapted_modules(model):
        raise ValueError("the model has no LoRA adapter to merge")
    merge_lora(model, dtype=dtype)
    out = Path(out_dir)
    save_model(model, out, dtype=dtype)
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, out)
    return out


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> None:
    """Copy the tokenizer / generation-config files of a model directory (those present)."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def summary(model: nn.Module) -> str:
    """ "trainable X / total Y parameters (Z%)" (NF4 weights counted by their unpacked size)."""
    from qkern_train.model import count_parameters

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = count_parameters(model)
    return f"trainable {trainable:,} / total {total:,} parameters ({100 * trainable / total:.3f}%)"


__all__ = [
    "LoRALinear",
    "LoraConfig",
    "adapted_modules",
    "adapter_state_dict",
    "apply_lora",
    "copy_tokenizer_files",
    "load_adapter",
    "lora_config_from_model",
    "lora_parameters",
    "merge_and_save",
    "merge_lora",
    "peft_config_dict",
    "read_adapter_config",
    "save_adapter",
    "summary",
    "trainable_parameters",
]
