"""HuggingFace checkpoints <-> :class:`~qkern_train.model.Transformer`: name map, loading, saving.

Reading
    ``model.safetensors`` or a sharded set listed by ``model.safetensors.index.json``, through
    ``safetensors.safe_open`` one tensor at a time. The model is first built on the meta device
    (no memory), then each parameter is materialized from the file straight onto the target
    device, so the whole 16-bit model never exists on the host.

NF4 on the fly (``load_in_4bit=True``)
    Each projection weight (q/k/v/o, gate/up/down) is read, moved to the device in the compute
    dtype, quantized to NF4 with double quantization (``qkern.quantize_4bit`` through
    ``qkern.QLoRALinear.from_linear``), and its 16-bit copy dropped before the next tensor is read.
    Memory arithmetic for a model with P parameters of which P_lin sit in projections and the
    largest single tensor holds T elements:

    * host: about one tensor in the file dtype (2T bytes for bf16) beyond the process baseline;
    * device: 2(P - P_lin) bytes for embeddings, norms and lm_head in bf16, plus the NF4 weights,
      0.5 byte per element + 1 byte per 64 elements of uint8 absmax + 4 bytes per 256 blocks of
      nested absmax, i.e. about 0.5156 byte per parameter, plus one 16-bit projection weight in
      flight. Llama-3.2-1B (P = 1.236e9, tied, P_lin = 0.973e9): 0.53 GB (embedding) + 0.50 GB
      (NF4) instead of 2.47 GB in bf16.

Pre-quantized bitsandbytes checkpoints
    A linear weight stored with ``.absmax`` / ``.quant_map`` / ``.quant_state.bitsandbytes__nf4``
    (or ``__fp4``) keys is loaded as a ``QLoRALinear`` without re-quantizing; the per-tensor JSON
    is trusted over ``config.json``'s ``quantization_config``. Such weights stay 4-bit whatever
    ``load_in_4bit`` says (dequantizing them would not restore the original weights). A quantized
    ``lm_head`` is dequantized to the compute dtype.

Writing
    :func:`save_model` writes 16-bit HF safetensors (optionally sharded, with the index) and
    ``config.json``; NF4 projections are written as their dequantized weights (adapters are not
    merged here). :func:`save_quantized` writes the bitsandbytes 4-bit format (projections NF4 +
    double quant, everything else 16-bit) with a ``quantization_config``.

Name map
    Our parameter names are HF's without the leading ``model.`` (``lm_head`` has none): see
    :data:`TOP_LEVEL_NAMES`, :data:`LAYER_NAMES`, :func:`from_hf_name` and :func:`to_hf_name`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import qkern
from qkern_train.model import ModelConfig, Transformer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# HF name -> our name, outside the layer stack
TOP_LEVEL_NAMES: dict[str, str] = {
    "model.embed_tokens.weight": "embed_tokens.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}
# HF name -> our name inside layer N (prefix "model.layers.N." on HF's side, "layers.N." on ours)
LAYER_NAMES: dict[str, str] = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    **{
        f"{block}.{proj}.{kind}": f"{block}.{proj}.{kind}"
        for block, projs in (
            ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
            ("mlp", ("gate_proj", "up_proj", "down_proj")),
        )
        for proj in projs
        for kind in ("weight", "bias")
    },
}
# modules that become NF4 with load_in_4bit (the LoRA targets); lm_head and embeddings never do
QUANTIZED_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# keys some checkpoints carry that hold nothing we need
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_BNB_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
_BNB_STATE = ".quant_state.bitsandbytes__"
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_DTYPE_BY_NAME = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_OUR_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")


def from_hf_name(name: str) -> str | None:
    """Our parameter name for an HF tensor name, or None when the name is not a model weight."""
    if name in TOP_LEVEL_NAMES:
        return TOP_LEVEL_NAMES[name]
    m = _LAYER_RE.match(name)
    if m and m.group(2) in LAYER_NAMES:
        return f"layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}"
    return None


_TOP_REVERSE = {v: k for k, v in TOP_LEVEL_NAMES.items()}
_LAYER_REVERSE = {v: k for k, v in LAYER_NAMES.items()}


def to_hf_name(name: str) -> str:
    """The HF tensor name of one of our parameter names."""
    if name in _TOP_REVERSE:
        return _TOP_REVERSE[name]
    m = _OUR_LAYER_RE.match(name)
    if m and m.group(2) in _LAYER_REVERSE:
        return f"model.layers.{m.group(1)}.{_LAYER_REVERSE[m.group(2)]}"
    raise ValueError(f"no HF name for parameter {name!r}")


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """torch dtype from a dtype or a name such as "bfloat16" / "bf16"."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).replace("torch.", "").lower()
    if key not in _DTYPE_BY_NAME:
        raise ValueError(f"unsupported dtype {dtype!r}; use float32, float16 or bfloat16")
    return _DTYPE_BY_NAME[key]


# ------------------------------------------------------------------------------------------------
# reading safetensors
# ------------------------------------------------------------------------------------------------


class SafetensorsReader:
    """Name -> tensor access over one safetensors file or a sharded set, without loading it."""

    def __init__(self, directory: str | Path) -> None:
        directory = Path(directory)
        if not directory.exists():
            raise FileNotFoundError(f"model directory {directory} does not exist")
        if not directory.is_dir():
            raise NotADirectoryError(f"{directory} is not a directory")
        index, single = directory / INDEX_FILE, directory / SINGLE_FILE
        self.files: dict[str, object] = {}  # file name -> open safe_open handle
        self._keys: dict[str, set[str]] = {}  # file name -> tensor names in its header
        self.location: dict[str, str] = {}  # tensor name -> file name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index} is not a valid safetensors index ({e})") from None
            for fname in sorted(set(weight_map.values())):
                self._open(directory / fname)
            for name, fname in weight_map.items():
                if name not in self._keys[fname]:
                    raise ValueError(f"{index} puts {name!r} in {fname}, which lacks it")
                self.location[name] = fname
        elif single.is_file():
            self._open(single)
            self.location = dict.fromkeys(self._keys[SINGLE_FILE], SINGLE_FILE)
        else:
            others = sorted(p.name for p in directory.glob("*.bin")) + sorted(
                p.name for p in directory.glob("*.pt*")
            )
            hint = (
                f" (found {', '.join(others)}: pickle checkpoints are not read; convert them to "
                "safetensors)"
                if others
                else ""
            )
            raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}{hint}")

    def _open(self, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint shard {path} is missing")
        try:
            handle = safe_open(str(path), framework="pt")
            keys = set(handle.keys())
        except Exception as e:  # safetensors raises its own error type for bad files
            raise ValueError(
                f"cannot read {path}: {e} (the file is truncated or not a safetensors file)"
            ) from None
        self.files[path.name] = handle
        self._keys[path.name] = keys

    def __contains__(self, name: str) -> bool:
        return name in self.location

    def keys(self) -> list[str]:
        return list(self.location)

    def _slice(self, name: str):
        return self.files[self.location[name]].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return str(self._slice(name).get_dtype())

    def get(self, name: str) -> torch.Tensor:
        try:
            return self.files[self.location[name]].get_tensor(name)
        except Exception as e:
            raise ValueError(
                f"cannot read tensor {name!r} from {self.location[name]}: {e}"
            ) from None

    def close(self) -> None:
        self.files.clear()


# ------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------


def _resolve_device_dtype(
    config: ModelConfig, dtype: torch.dtype | str | None, device: torch.device | str | None
) -> tuple[torch.dtype, torch.device]:
    dev = torch.device(device) if device is not None else None
    if dev is None:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = parse_dtype(dtype)
    if dt is None:
        # CPU: float32 (the reference ops are exact there and bf16 matmuls are slow);
        # GPU: the checkpoint's dtype when it is a 16-bit one, else bfloat16.
        if dev.type == "cpu":
            dt = torch.float32
        else:
            dt = _DTYPE_BY_NAME.get(config.torch_dtype, torch.bfloat16)
            dt = torch.bfloat16 if dt == torch.float32 else dt
    return dt, dev


def _check_float(reader: SafetensorsReader, name: str, shape: tuple[int, ...]) -> None:
    got_shape, got_dtype = reader.shape(name), reader.dtype(name)
    if got_dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"tensor {name!r} has dtype {got_dtype}; a floating-point tensor is expected"
        )
    if got_shape != tuple(shape):
        raise ValueError(
            f"tensor {name!r} has shape {list(got_shape)}; config.json implies {list(shape)}"
        )


def _set_param(module: nn.Module, attr: str, t: torch.Tensor) -> None:
    module._parameters[attr] = nn.Parameter(t, requires_grad=t.is_floating_point())


def _read_float(
    reader: SafetensorsReader, name: str, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    # move first, then cast: a dtype change then happens on the device, with no second host copy
    return reader.get(name).to(device).to(dtype)


def _bnb_group(reader: SafetensorsReader, weight: str) -> list[str] | None:
    """The keys of a bitsandbytes-quantized weight, or None when ``weight`` is a plain tensor."""
    state = [k for k in (weight + _BNB_STATE + "nf4", weight + _BNB_STATE + "fp4") if k in reader]
    if not state:
        return None
    return [weight, *state, *(weight + s for s in _BNB_SUFFIXES if weight + s in reader)]


def _load_bnb(
    reader: SafetensorsReader,
    keys: list[str],
    weight: str,
    shape: tuple[int, int],
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, qkern.QuantState]:
    tensors = {k: reader.get(k) for k in keys}
    packed = tensors[weight]
    if packed.dtype != torch.uint8:
        # bitsandbytes' quant_storage other than uint8 stores the same bytes under another dtype
        packed = packed.contiguous().view(torch.uint8)
    packed = packed.reshape(-1, 1)
    try:
        state = qkern.QuantState.from_bnb_dict(tensors, weight)
    except ValueError as e:
        raise ValueError(f"bitsandbytes weight {weight!r}: {e}") from None
    if tuple(state.shape) != tuple(shape):
        raise ValueError(
            f"tensor {weight!r} is quantized with shape {list(state.shape)}; config.json implies "
            f"{list(shape)}"
        )
    if packed.numel() != (state.numel() + 1) // 2:
        raise ValueError(
            f"tensor {weight!r} holds {packed.numel()} packed bytes; shape {list(shape)} needs "
            f"{(state.numel() + 1) // 2}"
        )
    return packed.to(device), replace(state.to(device), dtype=dtype)


def _quantization_config(config_path: Path) -> dict | None:
    q = json.loads(config_path.read_text()).get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method", "bitsandbytes")
    if method != "bitsandbytes" or q.get("load_in_8bit"):
        kind = "8-bit bitsandbytes" if method == "bitsandbytes" else repr(method)
        raise ValueError(
            f"quantization {kind} is not supported; only bitsandbytes 4-bit (nf4/fp4) checkpoints "
            "load"
        )
    return q


def _expected(model: Transformer) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) of every parameter the checkpoint must hold."""
    return [(to_hf_name(n), tuple(p.shape)) for n, p in model.named_parameters()]


def load_model(
    path: str | Path,
    load_in_4bit: bool = False,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> Transformer:
    """Load an HF model directory (config.json + safetensors) into a :class:`Transformer`.

    ``dtype`` is the compute dtype (default: float32 on CPU, the checkpoint's 16-bit dtype on
    CUDA); ``device`` defaults to CUDA when present. With ``load_in_4bit`` the projections become
    NF4 ``qkern.QLoRALinear`` while streaming (see the module docstring); pre-quantized
    bitsandbytes weights always load as NF4. Returns the model in eval mode.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {directory} does not exist")
    config_path = directory / "config.json"
    config = ModelConfig.from_file(config_path)
    _quantization_config(config_path)
    compute_dtype, dev = _resolve_device_dtype(config, dtype, device)
    reader = SafetensorsReader(directory)
    try:
        with torch.device("meta"):
            model = Transformer(config)
        expected = _expected(model)

        # every expected tensor present (plain or bitsandbytes), nothing left over
        consumed: set[str] = set()
        missing: list[str] = []
        groups: dict[str, list[str]] = {}
        for name, _ in expected:
            group = _bnb_group(reader, name) if name.endswith(".weight") else None
            if group is not None:
                groups[name] = group
                consumed.update(group)
            elif name in reader:
                consumed.add(name)
            else:
                missing.append(name)
        extra = [
            k
            for k in reader.keys()
            if k not in consumed
            and not _IGNORED.search(k)
            and not (k == "lm_head.weight" and config.tie_word_embeddings)
        ]
        if missing:
            raise ValueError(
                f"checkpoint {directory} lacks {len(missing)} tensor(s) the config needs: "
                f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"
            )
        if extra:
            raise ValueError(
                f"checkpoint {directory} has {len(extra)} tensor(s) this {config.architecture} "
                f"config does not use: {', '.join(sorted(extra)[:8])}"
                f"{' ...' if len(extra) > 8 else ''}"
            )
        for name, shape in expected:
            if name not in groups:
                _check_float(reader, name, shape)

        # materialize module by module, in model order (independent of the file order)
        for mod_name, module in list(model.named_modules()):
            if not any(True for _ in module.parameters(recurse=False)):
                continue
            if not isinstance(module, nn.Linear):
                for attr, _ in list(module.named_parameters(recurse=False)):
                    name = to_hf_name(f"{mod_name}.{attr}")
                    _set_param(module, attr, _read_float(reader, name, compute_dtype, dev))
                continue
            name = to_hf_name(f"{mod_name}.weight")
            bias = None
            if module.bias is not None:
                bias = _read_float(reader, name[: -len("weight")] + "bias", compute_dtype, dev)
            is_proj = mod_name.rsplit(".", 1)[-1] in QUANTIZED_LINEARS
            if name in groups:
                shape = (module.out_features, module.in_features)
                packed, state = _load_bnb(reader, groups[name], name, shape, compute_dtype, dev)
                if is_proj:
                    _replace_module(model, mod_name, qkern.QLoRALinear(packed, state, bias=bias))
                else:  # a quantized lm_head is dequantized: it stays in the compute dtype
                    w = qkern.dequantize_4bit(packed, state, dtype=compute_dtype)
                    _set_param(module, "weight", w)
            elif load_in_4bit and is_proj:
                w = _read_float(reader, name, compute_dtype, dev)
                _replace_module(model, mod_name, qkern.QLoRALinear.from_linear(w, bias=bias))
                del w  # the 16-bit copy goes before the next tensor is read
            else:
                _set_param(module, "weight", _read_float(reader, name, compute_dtype, dev))
                if bias is not None:
                    _set_param(module, "bias", bias)
    finally:
        reader.close()
    leftovers = [n for n, p in model.named_parameters() if p.is_meta]
    leftovers += [n for n, b in model.named_buffers() if b.is_meta]
    if leftovers:  # cannot happen after the checks above; a guard against silent garbage
        raise RuntimeError(f"parameters left unloaded: {leftovers[:8]}")
    return model.eval()


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantize_model(model: Transformer, blocksize: int = 64) -> Transformer:
    """Replace every 16-bit projection of ``model`` by an NF4 ``QLoRALinear`` (in place).

    One weight at a time: each 16-bit weight is freed once its NF4 copy exists (when nothing else
    references it). Embeddings, norms and lm_head are left as they are.
    """
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in QUANTIZED_LINEARS and isinstance(module, nn.Linear):
            _replace_module(model, name, qkern.QLoRALinear.from_linear(module, blocksize=blocksize))
            module.weight = None
    return model


# ------------------------------------------------------------------------------------------------
# saving
# ------------------------------------------------------------------------------------------------


def _dense_weight(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The 16-bit (out, in) weight of a linear module: NF4 modules are dequantized."""
    if hasattr(module, "base_weight"):
        return module.base_weight(dtype)
    return module.weight.detach().to(dtype)


def iter_hf_tensors(
    model: Transformer, dtype: torch.dtype = torch.bfloat16
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, CPU tensor in ``dtype``) for every weight of ``model``, one tensor at a time."""
    cfg = model.config
    yield "model.embed_tokens.weight", model.embed_tokens.weight.detach().to(dtype).cpu()
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", layer.input_layernorm.weight.detach().to(dtype).cpu()
        for block, projs in (
            ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
            ("mlp", ("gate_proj", "up_proj", "down_proj")),
        ):
            for proj in projs:
                m = getattr(getattr(layer, block), proj)
                yield f"{p}{block}.{proj}.weight", _dense_weight(m, dtype).cpu()
                if getattr(m, "bias", None) is not None:
                    yield f"{p}{block}.{proj}.bias", m.bias.detach().to(dtype).cpu()
        yield (
            p + "post_attention_layernorm.weight",
            layer.post_attention_layernorm.weight.detach().to(dtype).cpu(),
        )
    yield "model.norm.weight", model.norm.weight.detach().to(dtype).cpu()
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", _dense_weight(model.lm_head, dtype).cpu()


def _parse_size(size: int | str | None) -> int | None:
    if size is None or isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", str(size).upper())
    if not m:
        raise ValueError(f"max_shard_size must be bytes or like '5GB', got {size!r}")
    return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)])


def write_safetensors(
    tensors: Iterator[tuple[str, torch.Tensor]],
    directory: str | Path,
    max_shard_size: int | str | None = None,
) -> None:
    """Write tensors in order, starting a new shard when the current one would exceed the limit.

    At most one shard is held in host memory. A single shard is named model.safetensors; several
    are model-0000i-of-0000n.safetensors with an index.
    """
    directory = Path(directory)
    max_shard_size = _parse_size(max_shard_size)
    directory.mkdir(parents=True, exist_ok=True)
    for old in list(directory.glob("model*.safetensors")) + [directory / INDEX_FILE]:
        old.unlink(missing_ok=True)
    shards: list[list[str]] = []
    current: dict[str, torch.Tensor] = {}
    size = total = 0
    tmp_names: list[Path] = []

    def flush() -> None:
        nonlocal current, size
        if not current:
            return
        tmp = directory / f"model-shard-{len(shards):05d}.tmp.safetensors"
        save_file(current, str(tmp), metadata={"format": "pt"})
        tmp_names.append(tmp)
        shards.append(list(current))
        current, size = {}, 0

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if max_shard_size is not None and current and size + nbytes > max_shard_size:
            flush()
        current[name] = t.contiguous()
        size += nbytes
        total += nbytes
    flush()
    if len(shards) == 1:
        tmp_names[0].rename(directory / SINGLE_FILE)
        return
    weight_map = {}
    for i, (tmp, names) in enumerate(zip(tmp_names, shards)):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tmp.rename(directory / fname)
        weight_map.update(dict.fromkeys(names, fname))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def save_model(
    model: Transformer,
    path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: int | str | None = None,
) -> None:
    """Write ``model`` as 16-bit HF safetensors plus config.json into directory ``path``.

    NF4 projections are dequantized; LoRA adapters are not merged (merge them first).
    ``max_shard_size`` (bytes, or "5GB") splits the weights into shards with an index.
    """
    dtype = parse_dtype(dtype)
    directory = Path(path)
    write_safetensors(iter_hf_tensors(model, dtype), directory, max_shard_size)
    cfg = {**model.config.to_hf(), "torch_dtype": _dtype_name(dtype)}
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))


def iter_hf_tensors_4bit(
    model: Transformer, dtype: torch.dtype = torch.bfloat16, blocksize: int = 64
) -> Iterator[tuple[str, torch.Tensor]]:
    """Like :func:`iter_hf_tensors`, with every projection as bitsandbytes NF4 tensors."""
    projections = {
        to_hf_name(f"{n}.weight"): m
        for n, m in model.named_modules()
        if n.rsplit(".", 1)[-1] in QUANTIZED_LINEARS
    }
    for name, t in iter_hf_tensors(model, dtype):
        module = projections.get(name)
        if module is None:
            yield name, t
            continue
        if isinstance(module, qkern.QLoRALinear):
            packed, state = module.packed, module.quant_state
        else:
            w = module.weight.detach()
            packed, state = qkern.quantize_4bit(w.to(dtype), blocksize=blocksize)
        state = replace(state, dtype=dtype)
        for key, value in state.as_bnb_dict(name, packed=packed).items():
            yield key, value.detach().cpu()


def save_quantized(
    model: Transformer,
    path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: int | str | None = None,
    blocksize: int = 64,
) -> None:
    """Write ``model`` in the bitsandbytes 4-bit checkpoint format (NF4 + double quant).

    Projections already NF4 are written as they are (no re-quantization); 16-bit projections are
    quantized here. Embeddings, norms, biases and lm_head are written in ``dtype``.
    """
    dtype = parse_dtype(dtype)
    directory = Path(path)
    write_safetensors(iter_hf_tensors_4bit(model, dtype, blocksize), directory, max_shard_size)
    cfg = model.config.to_hf()
    cfg["torch_dtype"] = _dtype_name(dtype)
    cfg["quantization_config"] = {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": _dtype_name(dtype),
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": ["lm_head"],
    }
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
