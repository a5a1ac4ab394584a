"""NF4 / FP4 4-bit weight quantization with double quantization, bit-exact with bitsandbytes.

The format (the full description with tables is in ``docs/nf4.md``):

* A weight of any shape is flattened row-major and cut into blocks of ``blocksize`` consecutive
  elements (32 ... 4096, default 64; a block may cross a row boundary). Each block keeps its
  float32 ``absmax = max |x|``.
* Each element becomes a 4-bit index into a 16-entry code: ``x * (1 / absmax)`` (fp32) is compared
  with the 15 midpoints between adjacent code values; the index is the number of midpoints the
  value is *strictly* greater than (a value on a midpoint takes the lower code). FP4 compares
  ``|x|`` with 7 thresholds and puts the sign in bit 3.
* Two indices per byte, the even element in the high nibble; an odd element count pads one zero
  element. The packed weight is uint8 ``[(n + 1) // 2, 1]``.
* Double quantization (``compress_statistics=True``): ``offset = mean(absmax)``; ``absmax - offset``
  is quantized in blocks of 256 to 8-bit indices into the signed dynamic map, each 256-block with
  its own float32 scale (``nested_absmax``).
* Dequantization: ``absmax = fp32(map[q] * nested_absmax[b // 256]) + offset`` (two roundings, never
  a fused multiply-add), then ``out = dtype(code[index] * absmax)``.

What runs where:

* :func:`quantize_4bit_ref` / :func:`dequantize_4bit_ref` are plain PyTorch float32 code (the CPU
  path and the test oracle); they use an IEEE reciprocal.
* The Triton kernels (CUDA tensors, or CPU tensors under the Triton interpreter) compute the same
  function. On a GPU the quantize kernels take ``1/absmax`` from the hardware reciprocal
  (``rcp.approx.ftz.f32``), as bitsandbytes' fast-math CUDA build does, so that values lying
  within an ulp of a midpoint land where bitsandbytes puts them. Under the interpreter they use the
  IEEE reciprocal, like the reference, and match it bit for bit.
* Host cost per call is kept small (the QLoRA linear dequantizes every weight twice per step):
  :func:`dequantize_4bit` validates a state fully once and caches its launch arguments on it,
  later calls check only the packed tensor and the output with integer and identity compares;
  tile sizes come from a table (no autotuner dispatch), and repeated launches go straight to the
  compiled kernel Triton returned the first time (see ``_launch``). :func:`quantize_4bit` keeps
  a plan per input shape / dtype / device and arguments (checks, grids, tables, compiled
  kernels; never anything of the data), so a repeated shape costs its output allocations, the
  launches (integer pointers, no Triton dispatch) and, with double quantization, torch's mean:
  three GPU operations with double quantization, one without, and no host sync either way. The
  one read-back (the offset, or without double quantization the finite check) happens on the
  state's first use (see :class:`QuantState`).

Limits: input dtypes float32 / float16 / bfloat16, output dtypes the same three; at least one
element; finite values only (NaN / Inf raise ``ValueError``: in ``quantize_4bit`` on the
reference path, on the first use of the returned state on the Triton path). A block whose
``1 / absmax`` is infinite (all zero, or absmax below ~2^-128; on the GPU any subnormal absmax,
as the hardware reciprocal flushes it) encodes every element as index 0. bitsandbytes' CUDA
build flushes float32 subnormals to zero; this module does not, so blocks whose absmax is below
~4e-37 can differ (no fp16 input and no realistic weight reaches that). The GPU paths use
NVIDIA PTX (inline ``rcp.approx`` / ``mul.rn`` / ``cvt.rn.bf16x2``) and are written for NVIDIA
cards (benchmarks: docs/nf4.md).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from fractions import Fraction
from functools import cache

import torch
import triton
import triton.language as tl
from triton.runtime import driver as _driver

from qkern import _backend

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QUANT_TYPES = ("nf4", "fp4")
NESTED_BLOCKSIZE = 256
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_NAME_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}


# --------------------------------------------------------------------------------------------
# Code tables
# --------------------------------------------------------------------------------------------


def _f32_literal(text: str) -> float:
    """The float32 value a C compiler gives the literal ``<text>f``: the decimal rounded once.

    Going through a Python float (double) first rounds twice, and for 4 of the 15 NF4 midpoints
    (decimal renderings of values that sit exactly between two float32 numbers) that lands on the
    neighbouring float32. bitsandbytes compares against the compiler's value, so we do too.
    """
    exact = Fraction(text)
    approx = torch.tensor(float(exact), dtype=torch.float32)
    candidates = [
        torch.nextafter(approx, torch.tensor(-math.inf)),
        approx,
        torch.nextafter(approx, torch.tensor(math.inf)),
    ]
    # nearest; on an exact tie the candidate with the even significand (round-half-even)
    best = min(
        candidates,
        key=lambda c: (abs(Fraction(c.item()) - exact), int(c.view(torch.int32).item()) & 1),
    )
    return best.item()


# NF4 code values (quantiles of N(0, 1) scaled to [-1, 1]); each decimal is an exact float32.
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
# The 15 decision thresholds of bitsandbytes' NF4 encoder (float32 literals in its CUDA source).
NF4_THRESHOLDS = tuple(
    _f32_literal(s)
    for s in (
        "-0.8480964004993439",
        "-0.6106329262256622",
        "-0.4599952697753906",
        "-0.33967943489551544",
        "-0.23460740596055984",
        "-0.13791173323988914",
        "-0.045525018125772476",
        "0.03979014977812767",
        "0.1202552504837513",
        "0.2035212516784668",
        "0.2920137718319893",
        "0.3893125355243683",
        "0.5016634166240692",
        "0.6427869200706482",
        "0.8614784181118011",
    )
)
# FP4 (1 sign, 2 exponent, 1 mantissa bits, bias 3): magnitudes of 0b000..0b111 are
# 0, 0.0625, 8, 12, 4, 6, 2, 3, divided by 12 — not monotonic in the index.
FP4_MAGNITUDES = tuple(
    _f32_literal(s)
    for s in (
        "0.0",
        "0.005208333333",
        "0.66666667",
        "1.0",
        "0.33333333",
        "0.5",
        "0.16666667",
        "0.25",
    )
)
FP4_CODE = FP4_MAGNITUDES + tuple(-m for m in FP4_MAGNITUDES)
# Thresholds on |x| between the sorted magnitudes 0, 1/192, 1/6, 1/4, 1/3, 1/2, 2/3, 1.
FP4_THRESHOLDS = tuple(
    _f32_literal(s)
    for s in (
        "0.00260417",
        "0.0859375",
        "0.20833333",
        "0.29166667",
        "0.4166667",
        "0.583333",
        "0.8333333",
    )
)
# number of thresholds below |x| (0..7) -> FP4 magnitude index: c ^ 4 when bit 1 of c is set
FP4_RANK_TO_INDEX = (0, 1, 6, 7, 4, 5, 2, 3)

# NF4 bucket lookup (the quantize kernel's code search). A scaled value s in [-1, 1] falls in
# bucket k = RNE(16 * s + 16) in 0..32, read off the float32 sum u = 16 * s + (2^23 + 16): in
# [2^23, 2^24) the float32 spacing is 1, so u is 2^23 + k exactly (one rounding of an exact
# value: 16 * s is exact) and k is the low bits of u's bit pattern. A bucket spans 1/16 = 0.0625
# of s, less than the smallest gap between two NF4 thresholds (0.0796), so it holds at most one
# threshold, and the index is c_k + (s > t_k): c_k thresholds lie in lower buckets (all below
# s, as RNE is monotonic), t_k is the bucket's own threshold (+inf when it has none). Every step
# is exact, so this counts the thresholds strictly below s exactly like the 15 comparisons.


def _rne_int(v: Fraction) -> int:
    """v rounded to the nearest integer, ties to even (float32 round-to-nearest at spacing 1)."""
    lo = math.floor(v)
    rest = v - lo
    return lo + (1 if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and lo % 2) else 0)


def _build_nf4_lookup() -> torch.Tensor:
    """64 int64 entries ``(c_k << 32) | float32 bits of t_k``; buckets 33..63 (reached only by
    non-finite values, whose blocks are rejected) give index 0."""
    buckets = [_rne_int(Fraction(t) * 16 + 16) for t in NF4_THRESHOLDS]
    assert buckets == sorted(set(buckets)) and buckets[-1] <= 32, "one threshold per bucket"
    entries = []
    for k in range(64):
        below = sum(b < k for b in buckets) if k <= 32 else 0
        t = NF4_THRESHOLDS[below] if k in buckets else math.inf
        bits = torch.tensor(t, dtype=torch.float32).view(torch.int32).item() & 0xFFFFFFFF
        entries.append((below << 32) | bits)
    return torch.tensor(entries, dtype=torch.int64)


@cache
def _table_cpu(name: str) -> torch.Tensor:
    tables = {
        "nf4": NF4_CODE,
        "fp4": FP4_CODE,
        "nf4_thresholds": NF4_THRESHOLDS,
        "fp4_thresholds": FP4_THRESHOLDS,
    }
    if name == "dynamic":
        return _build_dynamic_map()
    if name == "nf4_lookup":
        return _build_nf4_lookup()
    return torch.tensor(tables[name], dtype=torch.float32)


def _table(name: str, device: torch.device | str) -> torch.Tensor:
    """The table ``name`` on ``device``, one cached tensor per device: treat it as read-only."""
    if not isinstance(device, torch.device):
        device = torch.device(device)
    return _table_on_device(name, device)


@cache
def _table_on_device(name: str, device: torch.device) -> torch.Tensor:
    return _table_cpu(name).to(device)


def code_table(quant_type: str) -> torch.Tensor:
    """The 16 float32 code values of ``quant_type`` (a fresh CPU tensor)."""
    _check_quant_type(quant_type)
    return _table_cpu(quant_type).clone()


def _build_dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (256 sorted float32 values in [-1, 1]).

    For i = 0..6: the midpoints of ``linspace(0.1, 1, 2**i + 1)`` (float32, torch's linspace),
    times ``10 ** (i - 6)`` (a Python scalar times a float32 tensor, rounded to float32), with both
    signs; then 0 and 1.0; sorted. These are exactly torch's float32 operations: the same steps in
    numpy give other last bits for some entries, which would change dequantized absmax values.
    """
    values: list[float] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += ((10 ** (i - 6)) * means).tolist()
        values += (-(10 ** (i - 6)) * means).tolist()
    values += [0.0, 1.0]
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


def dynamic_map() -> torch.Tensor:
    """The signed 8-bit dynamic map used for double quantization (a fresh CPU tensor)."""
    return _table_cpu("dynamic").clone()


# --------------------------------------------------------------------------------------------
# QuantState
# --------------------------------------------------------------------------------------------


@dataclass
class QuantState:
    """Everything needed to dequantize a packed 4-bit weight.

    ``absmax`` is float32 ``[n_blocks]``, or, with double quantization, uint8 ``[n_blocks]`` indices
    into ``nested_code`` scaled per 256 blocks by ``nested_absmax`` and shifted by ``offset``.
    ``code`` holds the 16 code values the 4-bit indices point to. ``offset`` is the float32
    ``mean(absmax)`` as a Python float (exactly representable). All tensors live on one device,
    that of the packed weight.

    Reading packed weights directly in a kernel: element i (row-major over ``shape``) is the high
    nibble of byte i // 2 when i is even, the low nibble when odd; its value is
    ``code[nibble] * scale[i // blocksize]`` rounded once to the output dtype, where ``scale`` is
    :meth:`dequantized_absmax` — with double quant ``fp32(nested_code[absmax[b]] *
    nested_absmax[b // 256]) + offset``, the product rounded before the add (no FMA).

    ``code`` and ``nested_code`` of a state made by the Triton quantizer are the module's cached
    per-device tables, shared by every such state: treat them as read-only. To change a state,
    assign its fields (or use ``dataclasses.replace``); :func:`dequantize_4bit` caches launch
    arguments on the state and revalidates when a field has been reassigned.

    A state made by the Triton quantizer is returned before the GPU has finished: with double
    quantization its offset is still a float32 scalar on the device; without, its absmax has
    not been checked for NaN yet. Reading ``offset`` (which every use of the state does:
    dequantization, the QLoRA kernels, serialization, ``to``, ``replace``, equality, pickling,
    :meth:`dequantized_absmax`) copies the offset (or the largest absmax) to the host once;
    that is also when NaN/Inf in the quantized weight raise ``ValueError`` (the kernel stores
    NaN as the absmax of such a block, so the mean or max comes back NaN). Assigning ``offset``
    replaces a pending value (without double quantization: assign None to skip the check).
    """

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    code: torch.Tensor
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    offset: float | None = None
    nested_blocksize: int = field(default=NESTED_BLOCKSIZE)

    # dequantize_4bit's cached launch arguments (a _DequantPlan); a class attribute, not a field:
    # replace() / to() / equality / repr ignore it, and pickling drops it (__getstate__)
    _plan = None

    def __getstate__(self) -> dict:
        self.offset  # noqa: B018 (reads a pending offset back, see _resolve_offset)
        state = dict(self.__dict__)
        state.pop("_plan", None)
        return state

    def __setstate__(self, state: dict) -> None:
        if "offset" in state:  # pickled while offset was a plain attribute
            state = dict(state)
            state["_offset"] = state.pop("offset")
        self.__dict__.update(state)

    @property
    def double_quant(self) -> bool:
        """True when ``absmax`` is itself quantized (uint8 indices + nested scales + offset)."""
        return self.nested_absmax is not None

    @property
    def n_blocks(self) -> int:
        return -(-self.numel() // self.blocksize)

    @property
    def device(self) -> torch.device:
        return self.absmax.device

    def numel(self) -> int:
        """Number of elements of the original (unquantized) weight."""
        return math.prod(self.shape)

    def to(self, device: torch.device | str) -> QuantState:
        """A copy with every tensor on ``device``."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return replace(
            self,
            absmax=self.absmax.to(device),
            code=self.code.to(device),
            nested_absmax=move(self.nested_absmax),
            nested_code=move(self.nested_code),
        )

    def dequantized_absmax(self) -> torch.Tensor:
        """float32 ``[n_blocks]`` block scales, double quantization undone as bitsandbytes does:
        ``fp32(nested_code[q] * nested_absmax[b // 256])``, then ``+ offset`` as a second add."""
        offset = self.offset  # settles a pending check (see _resolve_offset)
        if not self.double_quant:
            return self.absmax
        assert self.nested_code is not None and offset is not None
        q = self.absmax.long()
        scale = self.nested_absmax.repeat_interleave(self.nested_blocksize)[: q.numel()]
        prod = self.nested_code[q] * scale  # one float32 rounding
        return prod + torch.tensor(self.offset, dtype=torch.float32, device=prod.device)

    # ---- bitsandbytes serialization ---------------------------------------------------------

    def as_bnb_dict(
        self, prefix: str, packed: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """The state under bitsandbytes' safetensors keys.

        ``prefix`` is the full name of the packed weight tensor, e.g.
        ``"model.layers.0.self_attn.q_proj.weight"``; the state keys are ``prefix + ".absmax"``,
        ``".quant_map"``, ``".nested_absmax"``, ``".nested_quant_map"`` and
        ``".quant_state.bitsandbytes__nf4"`` (or ``__fp4``: uint8 bytes of a JSON dict). The packed
        weight itself belongs under ``prefix``; pass it as ``packed`` to include it.
        """
        prefix = _clean_prefix(prefix)
        self.offset  # noqa: B018 (settles a pending check, see _resolve_offset)
        out: dict[str, torch.Tensor] = {}
        if packed is not None:
            out[prefix] = packed
        out[f"{prefix}.absmax"] = self.absmax
        # copies of the (possibly shared) tables: safetensors refuses tensors that share memory
        out[f"{prefix}.quant_map"] = self.code.clone()
        meta: dict = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": _DTYPE_NAMES[self.dtype],
            "shape": list(self.shape),
        }
        if self.double_quant:
            out[f"{prefix}.nested_absmax"] = self.nested_absmax
            out[f"{prefix}.nested_quant_map"] = self.nested_code.clone()
            meta.update(
                nested_blocksize=self.nested_blocksize,
                nested_dtype="float32",
                nested_offset=float(self.offset),
            )
        blob = json.dumps(meta).encode("utf-8")
        out[f"{prefix}.quant_state.bitsandbytes__{self.quant_type}"] = torch.tensor(
            list(blob), dtype=torch.uint8
        )
        return out

    @classmethod
    def from_bnb_dict(cls, tensors: dict[str, torch.Tensor], prefix: str) -> QuantState:
        """Read a state written by bitsandbytes (or :meth:`as_bnb_dict`) for the weight ``prefix``.

        ``tensors`` maps names to tensors (e.g. a safetensors file's contents); only keys starting
        with ``prefix + "."`` are read. The JSON entry is trusted over anything else; its
        quant_type must be nf4 or fp4. Shapes and dtypes are checked against it.
        """
        prefix = _clean_prefix(prefix)
        qs_keys = [k for k in tensors if k.startswith(f"{prefix}.quant_state.")]
        if len(qs_keys) != 1:
            raise ValueError(
                f"expected exactly one '{prefix}.quant_state.bitsandbytes__<type>' entry, "
                f"found {len(qs_keys)}: {qs_keys}"
            )
        suffix = qs_keys[0][len(f"{prefix}.quant_state.") :]
        if not suffix.startswith("bitsandbytes__") or suffix[len("bitsandbytes__") :] not in (
            QUANT_TYPES
        ):
            raise ValueError(
                f"unknown quant_type in checkpoint key '{qs_keys[0]}': expected "
                "bitsandbytes__nf4 or bitsandbytes__fp4"
            )
        blob = tensors[qs_keys[0]]
        try:
            meta = json.loads(bytes(blob.cpu().to(torch.uint8).tolist()).decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"'{qs_keys[0]}' is not a JSON quant-state blob: {e}") from e
        quant_type = meta.get("quant_type")
        if quant_type not in QUANT_TYPES:
            raise ValueError(
                f"unknown quant_type {quant_type!r} in '{qs_keys[0]}' (supported: nf4, fp4)"
            )
        if f"bitsandbytes__{quant_type}" != suffix:
            raise ValueError(f"'{qs_keys[0]}' holds quant_type {quant_type!r}, unlike its key")
        blocksize = int(meta.get("blocksize", -1))
        _check_blocksize(blocksize, "blocksize in checkpoint")
        dtype_name = meta.get("dtype")
        if dtype_name not in _NAME_DTYPES:
            raise ValueError(f"unsupported dtype {dtype_name!r} in '{qs_keys[0]}'")
        shape = torch.Size(int(s) for s in meta["shape"])
        n = math.prod(shape)
        if n <= 0:
            raise ValueError(f"empty shape {list(shape)} in '{qs_keys[0]}'")
        n_blocks = -(-n // blocksize)

        def get(name: str) -> torch.Tensor:
            key = f"{prefix}.{name}"
            if key not in tensors:
                raise ValueError(f"missing key '{key}' in checkpoint")
            return tensors[key]

        absmax, code = get("absmax"), get("quant_map")
        if code.dtype != torch.float32 or code.numel() != 16:
            raise ValueError(f"'{prefix}.quant_map' must be float32 [16], got {_desc(code)}")
        if not torch.equal(code.reshape(-1).cpu(), _table_cpu(quant_type)):
            # bitsandbytes' CUDA kernels ignore quant_map and use their built-in table; a map
            # that differs would make the checkpoint mean something else there
            raise ValueError(
                f"'{prefix}.quant_map' is not the standard {quant_type} code table; "
                "custom 4-bit code tables are not supported"
            )
        if absmax.numel() != n_blocks:
            raise ValueError(
                f"'{prefix}.absmax' has {absmax.numel()} elements; shape {list(shape)} with "
                f"blocksize {blocksize} needs {n_blocks}"
            )
        nested = "nested_offset" in meta or f"{prefix}.nested_absmax" in tensors
        state = cls(
            absmax=absmax.reshape(-1),
            shape=shape,
            dtype=_NAME_DTYPES[dtype_name],
            blocksize=blocksize,
            quant_type=quant_type,
            code=code.reshape(-1),
        )
        if nested:
            nested_absmax, nested_code = get("nested_absmax"), get("nested_quant_map")
            nbs = int(meta.get("nested_blocksize", NESTED_BLOCKSIZE))
            if nbs != NESTED_BLOCKSIZE:
                raise ValueError(f"nested_blocksize {nbs} unsupported (bitsandbytes uses 256)")
            if "nested_offset" not in meta:
                raise ValueError(f"'{qs_keys[0]}' lacks nested_offset for a double-quantized state")
            if absmax.dtype != torch.uint8:
                raise ValueError(f"'{prefix}.absmax' must be uint8 with double quantization")
            if nested_absmax.dtype != torch.float32 or nested_absmax.numel() != -(-n_blocks // nbs):
                raise ValueError(
                    f"'{prefix}.nested_absmax' must be float32 [{-(-n_blocks // nbs)}], got "
                    f"{_desc(nested_absmax)}"
                )
            if nested_code.dtype != torch.float32 or nested_code.numel() != 256:
                raise ValueError(
                    f"'{prefix}.nested_quant_map' must be float32 [256], got {_desc(nested_code)}"
                )
            state.nested_absmax = nested_absmax.reshape(-1)
            state.nested_code = nested_code.reshape(-1)
            state.offset = float(torch.tensor(float(meta["nested_offset"]), dtype=torch.float32))
            state.nested_blocksize = nbs
        elif absmax.dtype != torch.float32:
            raise ValueError(f"'{prefix}.absmax' must be float32 without double quantization")
        return state


def _clean_prefix(prefix: str) -> str:
    if not isinstance(prefix, str) or not prefix.strip("."):
        raise ValueError(f"prefix must be the weight's tensor name, got {prefix!r}")
    return prefix.rstrip(".")


def _desc(t: torch.Tensor) -> str:
    return f"{str(t.dtype).replace('torch.', '')} {list(t.shape)}"


def _get_offset(self: QuantState) -> float | None:
    d = self.__dict__
    if "_pending_offset" in d:
        _resolve_offset(self)
    return d.get("_offset")


def _set_offset(self: QuantState, value: float | None) -> None:
    self.__dict__.pop("_pending_offset", None)
    self.__dict__.pop("_pending_stream", None)
    self.__dict__["_offset"] = value


def _resolve_offset(state: QuantState) -> None:
    """Settle a pending value left by the Triton quantizer: its one host sync, deferred to the
    state's first use.

    With double quantization the pending value is the offset, a float32 device scalar, copied
    to the host. Without, it is the float32 absmax vector itself, whose max is read back: the
    state's offset stays None, only the finite check happens here. The first kernel stores NaN
    as the absmax of a block holding NaN/Inf, so the mean (or max) is NaN exactly when the
    weight was not finite; the mean is +inf only when the sum of finite absmax values
    overflows. On an error the value stays pending, so every later use raises again.
    """
    d = state.__dict__
    pending = d.get("_pending_offset")
    if pending is None:  # another thread settled it meanwhile
        return
    if pending.is_cuda:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "the first use of a QuantState from quantize_4bit reads one value back from the "
                "GPU, which a CUDA graph capture cannot contain: use the state (or read "
                "state.offset) once before capturing"
            )
        # quantize_4bit may have run on another stream than this first use: wait for it
        stream = d.get("_pending_stream")
        if stream is not None and stream != torch.cuda.current_stream(pending.device):
            stream.synchronize()
    value = pending.max().item() if pending.dim() else pending.item()
    if math.isnan(value):
        raise ValueError(
            "w contains NaN or Inf; 4-bit quantization needs finite values (found when the "
            "state returned by quantize_4bit was first used)"
        )
    if math.isinf(value):
        raise ValueError("mean of the block absmax overflows float32; w is too large to quantize")
    d["_offset"] = None if pending.dim() else value
    d.pop("_pending_offset", None)
    d.pop("_pending_stream", None)


# ``offset`` is a dataclass field read and written through this property (installed after the
# class is built, so the generated __init__, replace(), repr and equality go through it).
QuantState.offset = property(_get_offset, _set_offset, doc="float32 mean of the block absmax")


# --------------------------------------------------------------------------------------------
# Validation shared by both paths
# --------------------------------------------------------------------------------------------


def _check_quant_type(quant_type: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


def _check_blocksize(blocksize: int, name: str = "blocksize") -> None:
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"{name} must be one of {BLOCKSIZES}, got {blocksize!r}")


def _check_weight(w: torch.Tensor, blocksize: int, quant_type: str) -> None:
    _backend.check_float(w, "w")
    if w.numel() == 0:
        raise ValueError(f"w is empty (shape {list(w.shape)}); nothing to quantize")
    _check_blocksize(blocksize)
    _check_quant_type(quant_type)


def _nonfinite_error() -> ValueError:
    return ValueError("w contains NaN or Inf; 4-bit quantization needs finite values")


def _check_state(packed: torch.Tensor, state: QuantState) -> None:
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a QuantState, got {type(state).__name__}")
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8, got {str(packed.dtype).replace('torch.', '')}")
    _check_quant_type(state.quant_type)
    _check_blocksize(state.blocksize, "state.blocksize")
    n = state.numel()
    if n <= 0:
        raise ValueError(f"state.shape {list(state.shape)} is empty")
    if packed.numel() != (n + 1) // 2:
        raise ValueError(
            f"packed has {packed.numel()} bytes but state.shape {list(state.shape)} needs "
            f"{(n + 1) // 2}: the state does not belong to this packed tensor"
        )
    if state.absmax.numel() != state.n_blocks:
        raise ValueError(
            f"state.absmax has {state.absmax.numel()} entries, state.shape with blocksize "
            f"{state.blocksize} needs {state.n_blocks}"
        )
    if state.code.dtype != torch.float32 or state.code.numel() != 16:
        raise ValueError(f"state.code must be float32 [16], got {_desc(state.code)}")
    if state.double_quant:
        if state.absmax.dtype != torch.uint8:
            raise ValueError(
                f"state.absmax must be uint8 codes with double quant, got {_desc(state.absmax)}"
            )
        n_nested = -(-state.n_blocks // state.nested_blocksize)
        if state.nested_blocksize != NESTED_BLOCKSIZE:
            raise ValueError(f"state.nested_blocksize must be 256, got {state.nested_blocksize}")
        if state.nested_absmax.dtype != torch.float32 or state.nested_absmax.numel() != n_nested:
            raise ValueError(
                f"state.nested_absmax must be float32 [{n_nested}], "
                f"got {_desc(state.nested_absmax)}"
            )
        if state.nested_code is None or state.nested_code.numel() != 256:
            raise ValueError("state.nested_code must be float32 [256] with double quant")
        if state.nested_code.dtype != torch.float32:
            raise ValueError(f"state.nested_code must be float32, got {_desc(state.nested_code)}")
        if state.offset is None:
            raise ValueError("state.offset must be set with double quant")
        _backend.check_same_device(
            packed=packed,
            absmax=state.absmax,
            nested_absmax=state.nested_absmax,
            nested_code=state.nested_code,
            code=state.code,
        )
    else:
        if state.absmax.dtype != torch.float32:
            raise ValueError(
                f"state.absmax must be float32 without double quant, got {_desc(state.absmax)}"
            )
        _backend.check_same_device(packed=packed, absmax=state.absmax, code=state.code)


def _check_out(
    out: torch.Tensor | None, dtype: torch.dtype | None, state: QuantState, packed: torch.Tensor
) -> torch.dtype:
    """The output dtype; checks a caller-provided ``out`` buffer against the state."""
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
        _backend.check_float(out, "out")
        if dtype is not None and out.dtype != dtype:
            raise ValueError(f"out has dtype {out.dtype} but dtype={dtype} was asked for")
        if out.shape != state.shape:
            raise ValueError(f"out has shape {list(out.shape)}, state.shape is {list(state.shape)}")
        if out.device != packed.device:
            raise ValueError(f"out is on {out.device}, packed on {packed.device}")
        if not out.is_contiguous():
            raise ValueError("out must be contiguous")
        return out.dtype
    dtype = state.dtype if dtype is None else dtype
    if dtype not in _backend.FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    return dtype


# --------------------------------------------------------------------------------------------
# Reference (pure PyTorch, float32) — the CPU path and the test oracle
# --------------------------------------------------------------------------------------------


def encode_4bit_ref(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    """4-bit indices (int64) of float32 values already divided by their block's absmax.

    NF4: the number of thresholds strictly below the value. FP4: sign in bit 3, the rank of
    ``|x|`` among 7 thresholds mapped to the magnitude index. NaN (an all-zero block: 0 * inf)
    gives index 0, as every comparison is false in bitsandbytes' decision tree.
    """
    nan = torch.isnan(scaled)
    if quant_type == "nf4":
        thr = _table("nf4_thresholds", scaled.device)
        idx = torch.bucketize(scaled, thr, right=False)  # #{t : t < x}
    else:
        thr = _table("fp4_thresholds", scaled.device)
        rank = torch.bucketize(scaled.abs(), thr, right=False)
        perm = torch.tensor(FP4_RANK_TO_INDEX, device=scaled.device)
        idx = perm[rank] + 8 * (scaled < 0).long()
    return torch.where(nan, 0, idx)


def quantize_8bit_dynamic_ref(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index (int64) into the sorted 256-entry ``code`` that bitsandbytes' 8-bit quantizer picks.

    A 7-step binary search from index 127 that keeps the last pivots below and above the value,
    then a choice against the midpoint of the final pivot and its neighbour ((a + b) * 0.5 in
    float32): above the upper midpoint -> upper, below the lower midpoint -> lower, else the pivot.
    This is nearest-value rounding except at exact midpoints and at the ends of the map (the
    search never lands on index 255, so 1.0 is reached only through the midpoint rule). NaN gives
    index 0.
    """
    pivot = torch.full_like(x, 127, dtype=torch.long)
    upper_p = torch.full_like(pivot, 255)
    lower_p = torch.zeros_like(pivot)
    lower = torch.full_like(x, -1.0)
    upper = torch.full_like(x, 1.0)
    val = code[pivot]
    step = 64
    while step > 0:
        gt = x > val
        lower_p = torch.where(gt, pivot, lower_p)
        lower = torch.where(gt, val, lower)
        upper_p = torch.where(gt, upper_p, pivot)
        upper = torch.where(gt, upper, val)
        pivot = torch.where(gt, pivot + step, pivot - step)
        val = code[pivot]
        step //= 2
    upper = torch.where(upper_p == 255, code[255], upper)
    lower = torch.where(lower_p == 0, code[0], lower)
    gt = x > val
    go_up = x > (upper + val) * 0.5
    go_down = x < (lower + val) * 0.5
    return torch.where(gt, torch.where(go_up, upper_p, pivot), torch.where(go_down, lower_p, pivot))


def double_quant_ref(
    absmax: torch.Tensor, offset: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double-quantize block scales: ``(codes u8 [nb], nested_absmax f32 [ceil(nb/256)], offset)``.

    ``offset`` defaults to ``absmax.mean()`` (torch's float32 mean, as bitsandbytes computes it).
    ``absmax - offset`` is cut into blocks of 256 (the last one padded with zeros), each scaled by
    ``1 / max|v|`` and rounded to the dynamic map with :func:`quantize_8bit_dynamic_ref`.
    """
    absmax = absmax.float().reshape(-1)
    if offset is None:
        offset = absmax.mean()
    offset = torch.as_tensor(offset, dtype=torch.float32, device=absmax.device)
    v = absmax - offset
    nb = v.numel()
    n_nested = -(-nb // NESTED_BLOCKSIZE)
    vb = torch.zeros(n_nested * NESTED_BLOCKSIZE, dtype=torch.float32, device=v.device)
    vb[:nb] = v
    vb = vb.view(n_nested, NESTED_BLOCKSIZE)
    nested = vb.abs().amax(dim=1)
    scaled = vb * (1.0 / nested)[:, None]
    codes = quantize_8bit_dynamic_ref(scaled, _table("dynamic", v.device))
    return codes.reshape(-1)[:nb].to(torch.uint8), nested, offset


def quantize_4bit_ref(
    w: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4", compress_statistics: bool = True
) -> tuple[torch.Tensor, QuantState]:
    """Reference 4-bit quantization (float32 math, IEEE reciprocal); see the module docstring."""
    _check_weight(w, blocksize, quant_type)
    if not bool(torch.isfinite(w).all()):
        raise _nonfinite_error()
    x = w.detach().reshape(-1).float()
    n = x.numel()
    nb = -(-n // blocksize)
    xb = torch.zeros(nb * blocksize, dtype=torch.float32, device=x.device)
    xb[:n] = x
    xb = xb.view(nb, blocksize)
    absmax = xb.abs().amax(dim=1)
    inv = 1.0 / absmax
    scaled = xb * inv[:, None]
    # A block whose reciprocal is infinite (all zero, or absmax below ~2^-128) gets NaN, hence
    # index 0 everywhere: 0 * inf = NaN is bitsandbytes' result for an all-zero block, and its
    # fast-math build (subnormals flushed to zero) gives the same for a subnormal absmax.
    scaled = torch.where(torch.isinf(inv)[:, None], torch.nan, scaled)
    idx = encode_4bit_ref(scaled, quant_type).reshape(-1)[: n + (n % 2)]  # keep the pad element
    packed = ((idx[0::2] << 4) | idx[1::2]).to(torch.uint8).reshape(-1, 1)
    state = QuantState(
        absmax=absmax,
        shape=torch.Size(w.shape),
        dtype=w.dtype,
        blocksize=blocksize,
        quant_type=quant_type,
        code=_table(quant_type, w.device).clone(),
    )
    if compress_statistics:
        codes, nested, offset = double_quant_ref(absmax)
        state.absmax = codes
        state.nested_absmax = nested
        state.nested_code = _table("dynamic", w.device).clone()
        state.offset = offset.item()
    return packed, state


def unpack_4bit_ref(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` 4-bit indices (int64) of a packed tensor, high nibble first."""
    b = packed.reshape(-1).long()
    return torch.stack([b >> 4, b & 15], dim=1).reshape(-1)[:n]


def dequantize_4bit_ref(
    packed: torch.Tensor,
    state: QuantState,
    out: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Reference dequantization: ``dtype(code[index] * absmax[block])`` in float32."""
    _check_state(packed, state)
    dtype = _check_out(out, dtype, state, packed)
    n = state.numel()
    idx = unpack_4bit_ref(packed, n)
    absmax = state.dequantized_absmax()
    scale = absmax.repeat_interleave(state.blocksize)[:n]
    vals = (_table(state.quant_type, packed.device)[idx] * scale).to(dtype).view(state.shape)
    if out is None:
        return vals
    out.copy_(vals)
    return out


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------

# FP4 decision thresholds as compile-time constants (exact float32 values, see FP4_THRESHOLDS);
# NF4 uses the bucket table (_build_nf4_lookup) and its constants.
_F0, _F1, _F2, _F3, _F4, _F5, _F6 = (tl.constexpr(t) for t in FP4_THRESHOLDS)

# How the GPU kernels form 1/absmax when quantizing. bitsandbytes' CUDA build (fast math) turns
# `1.0f / absmax` into the hardware reciprocal, which is within an ulp of the IEEE quotient but
# not always equal to it; a value within that ulp of a threshold then changes code. Modes:
# 0 = IEEE (div.rn), 1 = rcp.approx.ftz.f32 (what fast math emits), 2 = div.full.ftz.f32.
# The interpreter always uses 0 (same as the reference).
RCP_IEEE, RCP_APPROX, RCP_DIV_FULL = 0, 1, 2
GPU_RCP_MODE = RCP_APPROX


@triton.jit
def _reciprocal(a, RCP: tl.constexpr):
    """1 / a in float32 by the chosen method (a >= 0; 1/0 = +inf in every mode)."""
    if RCP == 1:
        r = tl.inline_asm_elementwise(
            "rcp.approx.ftz.f32 $0, $1;", "=r,r", [a], dtype=tl.float32, is_pure=True, pack=1
        )
    elif RCP == 2:
        r = tl.inline_asm_elementwise(
            "div.full.ftz.f32 $0, 0f3F800000, $1;",
            "=r,r",
            [a],
            dtype=tl.float32,
            is_pure=True,
            pack=1,
        )
    else:
        r = tl.math.div_rn(tl.full(a.shape, 1.0, tl.float32), a)
    return r


@triton.jit
def _mul_no_fma(a, b, EXACT_MUL: tl.constexpr):
    """a * b rounded to float32 on its own. On the GPU `mul.rn` forbids the compiler to contract
    it with a following add into an FMA (one rounding instead of bitsandbytes' two)."""
    if EXACT_MUL:
        p = tl.inline_asm_elementwise(
            "mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        p = a * b
    return p


@triton.jit
def _nf4_lookup(s, add, tbl_ptr):
    """NF4 index of scaled values s (0..15): the number of NF4 thresholds strictly below s.

    Bucket k = low 6 bits of the float32 ``16 * s + add`` (add = 2^23 + 16, or 2^23 for the
    zero blocks of the kernel below), then one 8-byte gather from the 64-entry table built by
    _build_nf4_lookup: index = c_k + (s > t_k). Exact for every float32 s (see the table's
    comment); values of rejected non-finite blocks still index inside the table.
    """
    u = s * 16.0 + add
    e = tl.load(tbl_ptr + (u.to(tl.int32, bitcast=True) & 63))
    t = e.to(tl.int32).to(tl.float32, bitcast=True)
    return (e >> 32).to(tl.int32) + (s > t).to(tl.int32)


@triton.jit
def _fp4_index(x):
    """FP4 index: bit 3 = (x < 0); the rank r of |x| among the 7 thresholds (3-level search)
    maps to the magnitude index r ^ 4 when bit 1 of r is set (0,1,6,7,4,5,2,3)."""
    a = tl.abs(x)
    b2 = a > _F3
    b1 = a > tl.where(b2, _F5, _F1)
    t0 = tl.where(b2, tl.where(b1, _F6, _F4), tl.where(b1, _F2, _F0))
    b0 = a > t0
    rank = b2.to(tl.int32) * 4 + b1.to(tl.int32) * 2 + b0.to(tl.int32)
    mag = rank ^ ((rank & 2) * 2)
    return mag + (x < 0).to(tl.int32) * 8


@triton.jit
def _split_pair(w, IN_TY: tl.constexpr):
    """The two inputs packed in one little-endian word, as float32 (first = low half)."""
    if IN_TY == tl.bfloat16:
        # a bfloat16 is the top half of the float32 with the same value: two integer ops
        u = w.to(tl.uint32, bitcast=True)
        first = (u << 16).to(tl.float32, bitcast=True)
        second = (u & 0xFFFF0000).to(tl.float32, bitcast=True)
    elif IN_TY == tl.float16:
        u = w.to(tl.uint32, bitcast=True)
        first = (u & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        second = (u >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        u = w.to(tl.uint64, bitcast=True)
        first = (u & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
        second = (u >> 32).to(tl.uint32).to(tl.float32, bitcast=True)
    return first, second


@triton.jit
def _quantize_4bit_kernel(
    x_ptr,
    packed_ptr,
    absmax_ptr,
    tbl_ptr,
    n,
    BLOCKSIZE: tl.constexpr,
    NF4: tl.constexpr,
    RCP: tl.constexpr,
    EXACT_MUL: tl.constexpr,
    IN_WORDS: tl.constexpr,
    ROWS: tl.constexpr,
    FULL: tl.constexpr,
):
    """ROWS blocks of BLOCKSIZE elements per program: absmax_b = max|x|, then the index of
    s = x * (1/absmax_b) for every element, packed two per byte (even element high).

    The tile is [ROWS, BLOCKSIZE/2] in byte space, so the pair of inputs that forms one byte sits
    in one lane. IN_WORDS (even n, input aligned to a pair): the pair is one 32-bit word (64-bit
    for float32) read through x_ptr cast to an integer pointer of twice the width, loaded as
    contiguous vectors and split by shifts. Otherwise even and odd elements are two strided loads
    (same cache lines, so DRAM still reads each byte once). Elements past n read as 0, which is
    bitsandbytes' padding for an odd n. FULL (n a multiple of BLOCKSIZE): every block is whole,
    so one bound per tile row masks everything and the compiler keeps 16-byte vector loads and
    stores; otherwise the bound is per byte, 2 * byte < n (byte < ceil(n / 2)). No bound forms
    n + 1 or n + BLOCKSIZE - 1, which can overflow int32.

    absmax and the finite check in one integer max: the bit pattern of |x| (sign cleared) is a
    non-negative int32 that orders like the magnitude, with +Inf (0x7F800000) above every finite
    value and NaN above +Inf. A block whose max pattern is >= 0x7F800000 held NaN/Inf; its absmax
    is stored as NaN, which the host turns into the error (mean or max of the absmax).

    Codes: NF4 by bucket lookup (_nf4_lookup: ~6 instructions and one L1 gather per value instead
    of a 4-level compare/select search), FP4 by its 3-level search. s = x * inv is one rounded
    multiply (mul.rn on the GPU, so it is never fused into the bucket's multiply-add). A block
    whose reciprocal is infinite (all zero, or a subnormal absmax) gets index 0 everywhere, as
    bitsandbytes' NaN rule gives for 0 * inf: inv is replaced by 0, so s = +-0, and NF4 adds 2^23
    instead of 2^23 + 16, which puts s = 0 in bucket 0 (index 0).
    """
    HALF: tl.constexpr = BLOCKSIZE // 2
    IN16: tl.constexpr = x_ptr.dtype.element_ty.primitive_bitwidth == 16
    pid = tl.program_id(0).to(tl.int64)
    blk = pid * ROWS + tl.arange(0, ROWS)  # [ROWS] block ids
    byte = blk[:, None] * HALF + tl.arange(0, HALF)[None, :]  # [ROWS, HALF] packed byte index
    blk_ok = blk * BLOCKSIZE < n
    if FULL:
        byte_ok = blk_ok[:, None]
    else:
        byte_ok = 2 * byte < n
    if IN_WORDS:
        if IN16:
            xw_ptr = x_ptr.to(tl.pointer_type(tl.int32))
        else:
            xw_ptr = x_ptr.to(tl.pointer_type(tl.int64))
        w = tl.load(xw_ptr + byte, mask=byte_ok, other=0)
        xe, xo = _split_pair(w, x_ptr.dtype.element_ty)
    else:
        even = 2 * byte
        if FULL:
            xe = tl.load(x_ptr + even, mask=byte_ok, other=0.0).to(tl.float32)
            xo = tl.load(x_ptr + even + 1, mask=byte_ok, other=0.0).to(tl.float32)
        else:
            xe = tl.load(x_ptr + even, mask=even < n, other=0.0).to(tl.float32)
            xo = tl.load(x_ptr + even + 1, mask=even + 1 < n, other=0.0).to(tl.float32)
    ae = xe.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    ao = xo.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    abits = tl.maximum(tl.max(ae, axis=1), tl.max(ao, axis=1))  # [ROWS]
    abits = tl.where(abits >= 0x7F800000, 0x7FC00000, abits)  # NaN/Inf -> NaN
    amax = abits.to(tl.float32, bitcast=True)
    tl.store(absmax_ptr + blk, amax, mask=blk_ok)
    inv = _reciprocal(amax, RCP)
    zero = inv > 3.4028234663852886e38  # 1/absmax = +inf
    inv = tl.where(zero, 0.0, inv)[:, None]
    se = _mul_no_fma(xe, inv, EXACT_MUL)
    so = _mul_no_fma(xo, inv, EXACT_MUL)
    if NF4:
        add = tl.where(zero, 8388608.0, 8388624.0)[:, None]  # 2^23, 2^23 + 16
        q = _nf4_lookup(se, add, tbl_ptr) * 16 + _nf4_lookup(so, add, tbl_ptr)
    else:
        q = _fp4_index(se) * 16 + _fp4_index(so)
    tl.store(packed_ptr + byte, q.to(tl.uint8), mask=byte_ok)


@triton.jit
def _quantize_absmax_kernel(
    absmax_ptr,
    offset_ptr,
    codes_ptr,
    nested_ptr,
    dmap_ptr,
    n_blocks,
    RCP: tl.constexpr,
    ROWS: tl.constexpr,
):
    """Double quantization of the float32 block scales, ROWS nested blocks of 256 per program.

    v = absmax - offset (offset = mean(absmax), read from device memory: no host sync), zero past
    the end; s = max|v| per 256; code = bitsandbytes' 8-bit search of v * (1/s) in the dynamic
    map (see quantize_8bit_dynamic_ref): 7 halving steps from index 127 keeping the last pivot
    below/above, then a midpoint test ((a + b) * 0.5 in float32) against the final pivot.
    The map is 1 KiB and stays in L1, so the 10 gathers per value are cache hits.
    """
    pid = tl.program_id(0)
    row = pid * ROWS + tl.arange(0, ROWS)
    idx = row[:, None] * 256 + tl.arange(0, 256)[None, :]
    valid = idx < n_blocks
    offset = tl.load(offset_ptr)
    v = tl.where(valid, tl.load(absmax_ptr + idx, mask=valid, other=0.0) - offset, 0.0)
    s = tl.max(tl.abs(v), axis=1)
    tl.store(nested_ptr + row, s, mask=row * 256 < n_blocks)
    x = v * _reciprocal(s, RCP)[:, None]

    pivot = tl.full(x.shape, 127, tl.int32)
    lower_p = tl.zeros(x.shape, tl.int32)
    upper_p = tl.full(x.shape, 255, tl.int32)
    lower = tl.full(x.shape, -1.0, tl.float32)
    upper = tl.full(x.shape, 1.0, tl.float32)
    val = tl.load(dmap_ptr + pivot)
    for i in tl.static_range(7):
        step = 64 >> i
        gt = x > val
        lower_p = tl.where(gt, pivot, lower_p)
        lower = tl.where(gt, val, lower)
        upper_p = tl.where(gt, upper_p, pivot)
        upper = tl.where(gt, upper, val)
        pivot = tl.where(gt, pivot + step, pivot - step)
        val = tl.load(dmap_ptr + pivot)
    upper = tl.where(upper_p == 255, tl.load(dmap_ptr + upper_p), upper)
    lower = tl.where(lower_p == 0, tl.load(dmap_ptr + lower_p), lower)
    gt = x > val
    up = tl.where(x > (upper + val) * 0.5, upper_p, pivot)
    down = tl.where(x < (lower + val) * 0.5, lower_p, pivot)
    code = tl.where(gt, up, down)
    tl.store(codes_ptr + idx, code.to(tl.uint8), mask=valid)


@triton.jit
def _block_absmax(
    blk, ok, absmax_ptr, nested_ptr, ncode_ptr, offset, DQ: tl.constexpr, EXACT: tl.constexpr
):
    """float32 scale of quantization block(s) blk: the stored absmax, or with double quant
    fp32(ncode[q_b] * nested[b // 256]) + offset with two roundings (never an FMA)."""
    if DQ:
        q = tl.load(absmax_ptr + blk, mask=ok, other=0).to(tl.int32)
        scale = tl.load(nested_ptr + blk // 256, mask=ok, other=0.0)
        a = _mul_no_fma(tl.load(ncode_ptr + q), scale, EXACT) + offset
    else:
        a = tl.load(absmax_ptr + blk, mask=ok, other=0.0)
    return a


@triton.jit
def _round_pack(first, second, out_ty: tl.constexpr, PTX: tl.constexpr):
    """Two adjacent float32 outputs rounded to out_ty (to nearest, ties to even) and packed into
    one little-endian word, first in the low half: int32 for 16-bit outputs, int64 for float32.
    On the GPU one ``cvt.rn.bf16x2.f32`` / ``cvt.rn.f16x2.f32`` rounds and packs the pair (the
    compiler does not always pair two separate conversions, and a single-value conversion
    issues at a quarter of the rate)."""
    if out_ty == tl.float32:
        lo = first.to(tl.uint32, bitcast=True).to(tl.uint64)
        hi = second.to(tl.uint32, bitcast=True).to(tl.uint64)
        w = (lo | (hi << 32)).to(tl.int64, bitcast=True)
    elif PTX:
        if out_ty == tl.bfloat16:
            w = tl.inline_asm_elementwise(
                "cvt.rn.bf16x2.f32 $0, $2, $1;",
                "=r,r,r",
                [first, second],
                dtype=tl.int32,
                is_pure=True,
                pack=1,
            )
        else:
            w = tl.inline_asm_elementwise(
                "cvt.rn.f16x2.f32 $0, $2, $1;",
                "=r,r,r",
                [first, second],
                dtype=tl.int32,
                is_pure=True,
                pack=1,
            )
    else:
        lo = first.to(out_ty).to(tl.uint16, bitcast=True).to(tl.uint32)
        hi = second.to(out_ty).to(tl.uint16, bitcast=True).to(tl.uint32)
        w = (lo | (hi << 16)).to(tl.int32, bitcast=True)
    return w


@triton.jit
def _dequantize_4bit_kernel(
    packed_ptr,
    absmax_ptr,
    nested_ptr,
    ncode_ptr,
    code_ptr,
    out_ptr,
    n,
    offset,
    BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    EXACT_MUL: tl.constexpr,
    WORDS: tl.constexpr,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    LARGE: tl.constexpr,
    ODD: tl.constexpr,
    FULL: tl.constexpr,
    PERSIST: tl.constexpr,
):
    """out[i] = dtype(code[nibble_i] * absmax[i // BLOCKSIZE]), in tiles of ROWS x COLS outputs.

    One tile per program, or with PERSIST a grid-stride loop: program p handles tiles p, p + G,
    p + 2G, ... (G = the grid, a few programs per SM, all resident at once), so every SM gets
    the same number of tiles to within one per program and the grid has no second, partial
    wave. LARGE switches the index math to int64 near 2^31 elements. With WORDS and an odd n,
    the last output (high nibble of the last byte) is written by program 0 on its own.
    EXACT_MUL (set on the GPU) selects inline PTX: the scale's unfused multiply and the paired
    rounding of outputs (_round_pack).
    """
    pid = tl.program_id(0)
    if LARGE:
        pid = pid.to(tl.int64)
    if PERSIST:
        n_tiles = (n - 1) // (ROWS * COLS) + 1
        step = tl.num_programs(0)
        if LARGE:
            n_tiles = n_tiles.to(tl.int64)
            step = step.to(tl.int64)
        for tile in range(pid, n_tiles, step):
            _dequantize_tile(
                tile,
                packed_ptr,
                absmax_ptr,
                nested_ptr,
                ncode_ptr,
                code_ptr,
                out_ptr,
                n,
                offset,
                BLOCKSIZE,
                DOUBLE_QUANT,
                EXACT_MUL,
                WORDS,
                ROWS,
                COLS,
                FULL,
            )
    else:
        _dequantize_tile(
            pid,
            packed_ptr,
            absmax_ptr,
            nested_ptr,
            ncode_ptr,
            code_ptr,
            out_ptr,
            n,
            offset,
            BLOCKSIZE,
            DOUBLE_QUANT,
            EXACT_MUL,
            WORDS,
            ROWS,
            COLS,
            FULL,
        )
    if WORDS and ODD:
        last = n - 1
        a_last = _block_absmax(
            last // BLOCKSIZE,
            last >= 0,
            absmax_ptr,
            nested_ptr,
            ncode_ptr,
            offset,
            DOUBLE_QUANT,
            EXACT_MUL,
        )
        b_last = tl.load(packed_ptr + last // 2).to(tl.int32)
        v_last = (tl.load(code_ptr + (b_last >> 4)) * a_last).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + last, v_last, mask=pid == 0)


@triton.jit
def _dequantize_tile(
    tile,
    packed_ptr,
    absmax_ptr,
    nested_ptr,
    ncode_ptr,
    code_ptr,
    out_ptr,
    n,
    offset,
    BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    EXACT_MUL: tl.constexpr,
    WORDS: tl.constexpr,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    FULL: tl.constexpr,
):
    """Tile ``tile``: outputs [tile * ROWS * COLS, (tile + 1) * ROWS * COLS) as [ROWS, COLS].

    COLS = min(BLOCKSIZE, tile) never spans two quantization blocks, so the block scale is
    computed once per tile row (_block_absmax), not per element. FULL (n a multiple of COLS):
    each tile row is wholly inside or outside the tensor, so one bound per row masks it and the
    packed bytes load as 16-byte vectors; otherwise the bound is per element.

    Nibble expansion, two schemes (both written so every global access is a plain contiguous or
    gathered load/store, no cross-lane interleave):
    * WORDS=True (byte space): byte j holds outputs 2j (high nibble) and 2j+1 (low nibble). The
      tile loads ROWS x COLS/2 contiguous bytes (vector loads), dequantizes both nibbles, packs the
      two rounded outputs into one 32-bit word (64-bit for float32 output), and stores the words
      contiguously through ``out_ptr`` cast to an integer pointer of twice the width: 16-byte
      vector stores and one byte load per two outputs. Needs ``out`` aligned to a word; an odd
      n leaves the last output to the kernel.
    * WORDS=False (output space): output i reads byte i // 2 and shifts by 4 * (1 - i % 2). The
      stores are contiguous 16-byte vectors; the byte loads are one narrow load per output (the
      second of each pair hits L1). Used when ``out`` is not aligned for the word view.
    The 16-entry code table is gathered from global memory; 64 B, always an L1 hit.
    """
    OUT16: tl.constexpr = out_ptr.dtype.element_ty.primitive_bitwidth == 16
    rows = tl.arange(0, ROWS)
    row_start = tile * (ROWS * COLS) + rows * COLS  # [ROWS] first output of each row
    row_ok = row_start < n
    absmax = _block_absmax(
        row_start // BLOCKSIZE,
        row_ok,
        absmax_ptr,
        nested_ptr,
        ncode_ptr,
        offset,
        DOUBLE_QUANT,
        EXACT_MUL,
    )[:, None]
    out_ty = out_ptr.dtype.element_ty
    if WORDS:
        if OUT16:
            words_ptr = out_ptr.to(tl.pointer_type(tl.int32))
        else:
            words_ptr = out_ptr.to(tl.pointer_type(tl.int64))
        HALF: tl.constexpr = COLS // 2
        # Written as (c // VEC) * VEC + c % VEC (= c), the byte/word index is known to be
        # contiguous in runs of VEC only, so the packed bytes load VEC at a time, in the very
        # layout of the 16-byte word stores (VEC words); a longer run would give the loads
        # 16-byte vectors in another layout and a conversion through shared memory (with
        # barriers) between loads and stores.
        VEC: tl.constexpr = 4 if OUT16 else 2
        c = tl.arange(0, HALF)
        j = tile * (ROWS * HALF) + rows[:, None] * HALF + ((c // VEC) * VEC + c % VEC)[None, :]
        if FULL:
            ok = row_ok[:, None]
        else:
            ok = j < n // 2
        b = tl.load(packed_ptr + j, mask=ok, other=0).to(tl.int32)
        first = tl.load(code_ptr + (b >> 4)) * absmax
        second = tl.load(code_ptr + (b & 15)) * absmax
        tl.store(words_ptr + j, _round_pack(first, second, out_ty, EXACT_MUL), mask=ok)
    else:
        i = row_start[:, None] + tl.arange(0, COLS)[None, :]  # [ROWS, COLS] output index
        if FULL:
            ok = row_ok[:, None]
        else:
            ok = i < n
        b = tl.load(packed_ptr + (i >> 1), mask=ok, other=0).to(tl.int32)
        shift = (4 - (i & 1) * 4).to(tl.int32)
        v = tl.load(code_ptr + ((b >> shift) & 15)) * absmax
        tl.store(out_ptr + i, v.to(out_ty), mask=ok)


# ---- host launchers -------------------------------------------------------------------------
#
# Host time per call is part of the cost: the QLoRA linear dequantizes each weight once per
# forward and once per backward, and a 4096x4096 dequantization runs ~10 us on the GPU. So:
# compile-time arguments come from a small table (no autotuner or heuristics wrappers: each adds
# a dispatch layer that rebuilds argument dicts on every call); dequantize_4bit validates a state
# once and caches its launch arguments on it (quantize_4bit: once per input shape, _QuantPlan);
# the hot paths call no torch op except the allocations they return (and quantize's mean); and
# repeated launches skip Triton's per-call dispatch (_launch).

# The interpreter is chosen before triton is imported (the kernels above are interpreter or JIT
# functions since then), so reading the switch once is exact.
_INTERPRET = _backend.interpreter_enabled()
_ITEMSIZE = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}

# Direct launches (see _launch); switched off for the process if one ever fails.
_DIRECT = {"on": not _INTERPRET}


def _launch(kernel, grid: tuple, args: tuple, meta: dict, compiled: dict, key: tuple) -> None:
    """``kernel[grid](*args, **meta)``, through the compiled kernel an earlier call returned.

    Triton's JITFunction.run re-derives on every call what cannot change between our calls: it
    specializes each argument (dtype and 16-byte alignment of every pointer, width and
    divisibility by 16 of every int), formats a cache key and looks the compiled kernel up —
    about 5 us of Python per launch. That call returns the compiled kernel; ``compiled`` (owned
    by the caller: a state's plan entry, or a module dict) keeps it under (current device,
    ``key``), where ``key`` must capture every such specialization that can differ between calls
    sharing this ``compiled`` and ``meta``. A hit launches it as JITFunction.run does: the grid
    (three dimensions), the current stream, and every parameter in signature order, compile-time
    ones included (the same call in Triton 3.6 and 3.9). Launch hooks still run. On any error
    the JIT launch runs instead and direct launches stop; the kernels here are idempotent, so a
    repeated launch is harmless.
    """
    dev = None
    if _DIRECT["on"]:
        dev = _driver.active.get_current_device()
        hit = compiled.get((dev, key))
        if hit is not None:
            try:
                hit[0][grid](*args, *hit[1], stream=_driver.active.get_current_stream(dev))
                return
            except Exception:
                _DIRECT["on"] = False
    ck = kernel[grid](*args, **meta)
    if _DIRECT["on"]:
        entry = _direct_entry(kernel, ck, len(args), meta)
        if entry is not None:
            compiled[(dev, key)] = entry


def _direct_entry(kernel, ck, n_runtime: int, meta: dict) -> tuple | None:
    """``(compiled kernel, its compile-time argument values in signature order)`` for direct
    launches, or None when ``ck`` is not a compiled kernel or the JIT function has pre-run hooks
    (which a direct launch would skip)."""
    if not hasattr(ck, "packed_metadata") or getattr(kernel, "pre_run_hooks", 1) != []:
        return None
    names = kernel.arg_names[n_runtime:]
    if not all(name in meta for name in names):
        return None
    return ck, tuple(meta[name] for name in names)


def _spec_key(args: tuple) -> tuple:
    """What Triton specializes on for these runtime arguments (see _launch)."""
    return tuple(
        (a.dtype, a.data_ptr() % 16 == 0)
        if isinstance(a, torch.Tensor)
        else (type(a), a % 16 == 0, a == 1, -(2**31) <= a < 2**31)
        if isinstance(a, int)
        else type(a)
        for a in args
    )


_mode = _backend.get_backend

# Quantize tile: 4096 inputs per program (ROWS = 4096 / blocksize blocks, at least one block) and
# 4 warps, i.e. 32 inputs per thread: one 64-byte (bf16) or two (float32) contiguous loads and
# 16 packed bytes stored. 4096x4096 makes 4096 programs, ~31 per SM of an H100/H200; at 54
# registers per thread (NF4, bf16, sm_90) ~9 are resident per SM, ~70 KB of loads in flight.
_QUANT_ELEMS = 4096

# Dequantize tiles: ELEMS outputs per tile, nibble scheme, warps, and PER_SM: 0 for one tile per
# program, else a persistent grid of PER_SM programs per SM looping over the tiles.
#
# Why a persistent grid: a call moves bytes = n/2 packed + n/64 codes + 2n (bf16 out); at
# 4096x4096 that is 42 MB, ~10 us at the H200's copy rate, while the GPU's fixed costs (the first
# loads' latency before any store, the last programs draining) stay ~constant per call. With
# one tile per program, 4096x4096 is 4096 programs of 10 KB at 4096 outputs (~16 resident per
# SM of 132: just under two waves, and the second one drains unevenly); with PER_SM = 8, 1056
# programs all start at once and each loops over ~3.9 tiles, so every SM moves 31-32 tiles of
# 10 KB and they all finish together; the SM's other resident programs hide a program's load
# latency (8 x 2 KB of packed loads in flight per SM, plus the posted stores). PER_SM x
# num_warps stays at 32 warps (half an SM), so every program is resident as long as the
# kernel uses at most 64 registers per thread.
#
# The hot path picks from a table (_dequant_config): below 2^20 outputs ELEMS=2048 (at least
# 512 programs, so small weights still spread over every SM); up to 2^22, ELEMS=4096 with 4
# warps (32 outputs per thread: one 16-byte packed load, four 16-byte bf16 word stores); a
# misaligned output takes the output-space scheme. From 2^22 outputs on (>= 8 MiB of bf16,
# >= ~3 us per call) the candidates in _TUNE_CONFIGS are timed once per (n, blocksize, double
# quant, dtype) and the fastest kept, as an autotuner would, but outside the per-call path: the
# choice is cached with the state's launch arguments.
_DEQUANT_CONFIGS = (
    {"ELEMS": 4096, "WORDS": True, "num_warps": 4},
    {"ELEMS": 8192, "WORDS": True, "num_warps": 8},
    {"ELEMS": 8192, "WORDS": True, "num_warps": 4},
    {"ELEMS": 2048, "WORDS": True, "num_warps": 4},
    {"ELEMS": 4096, "WORDS": False, "num_warps": 4},
    {"ELEMS": 8192, "WORDS": False, "num_warps": 8},
    {"ELEMS": 4096, "WORDS": True, "num_warps": 4, "PER_SM": 8},
    {"ELEMS": 8192, "WORDS": True, "num_warps": 8, "PER_SM": 4},
    {"ELEMS": 4096, "WORDS": True, "num_warps": 4, "PER_SM": 4},
    {"ELEMS": 2048, "WORDS": True, "num_warps": 4, "PER_SM": 8},
)
_TUNE_CONFIGS = tuple(c for c in _DEQUANT_CONFIGS if c["WORDS"])
_TUNE_MIN_N = 1 << 22
_TUNED: dict[tuple, dict] = {}


class _DequantPlan:
    """A validated QuantState's launch arguments, cached on the state as ``state._plan``.

    dequantize_4bit builds it after the full check of a state (``_check_state``) and reuses it
    while every field of the state is the very object it was built from (ten identity
    compares), so assigning any field (``state.absmax = ...``, ``state.offset = ...``) makes the
    next call validate again. Per call only what can differ between calls is checked: the packed
    tensor (dtype, byte count, device) and the output (dtype, shape, device, contiguity). State
    tensors must not be resized in place (no code here does).
    ``launches`` maps (output dtype, output word-aligned) to (grid, compile-time arguments,
    compiled kernels: see _launch).
    """

    __slots__ = (
        "absmax",
        "shape",
        "dtype",
        "blocksize",
        "quant_type",
        "code",
        "nested_absmax",
        "nested_code",
        "offset",
        "nested_blocksize",
        "dq",
        "nested",
        "ncode",
        "offset_arg",
        "device",
        "is_cuda",
        "n",
        "n_bytes",
        "launches",
    )

    def __init__(self, state: QuantState) -> None:
        self.absmax = state.absmax
        self.shape = state.shape
        self.dtype = state.dtype
        self.blocksize = state.blocksize
        self.quant_type = state.quant_type
        self.code = state.code
        self.nested_absmax = state.nested_absmax
        self.nested_code = state.nested_code
        self.offset = state.offset
        self.nested_blocksize = state.nested_blocksize
        self.dq = state.double_quant
        # without double quant the nested pointers are never read: pass the absmax/code again
        self.nested = state.nested_absmax if self.dq else state.absmax
        self.ncode = state.nested_code if self.dq else state.code
        self.offset_arg = float(state.offset) if self.dq else 0.0
        self.device = state.absmax.device
        self.is_cuda = self.device.type == "cuda"
        self.n = state.numel()
        self.n_bytes = (self.n + 1) // 2
        self.launches: dict[tuple, tuple] = {}

    def matches(self, s: QuantState) -> bool:
        return (
            self.absmax is s.absmax
            and self.nested_absmax is s.nested_absmax
            and self.offset is s.offset
            and self.code is s.code
            and self.nested_code is s.nested_code
            and self.shape is s.shape
            and self.dtype is s.dtype
            and self.blocksize is s.blocksize
            and self.quant_type is s.quant_type
            and self.nested_blocksize is s.nested_blocksize
        )


def _plan_for(packed: torch.Tensor, state: QuantState) -> _DequantPlan:
    """The state's cached plan after the per-call checks of ``packed``; builds it on first use.

    The lean checks are a subset of ``_check_state``: when one fails, the full check runs and
    raises the detailed error.
    """
    plan = state._plan if isinstance(state, QuantState) else None
    if plan is None or not plan.matches(state):
        _check_state(packed, state)
        plan = _DequantPlan(state)
        state._plan = plan
    elif not (
        isinstance(packed, torch.Tensor)
        and packed.dtype is torch.uint8
        and packed.numel() == plan.n_bytes
        and packed.device == plan.device
    ):
        _check_state(packed, state)
        raise ValueError("packed does not match the quant state")  # not reached
    return plan


@cache
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; 2 for CPU tensors (the interpreter), so that
    the tests run the persistent loop with several tiles per program."""
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def _dequant_meta(plan: _DequantPlan, cfg: dict, words_ok: bool) -> tuple[tuple, dict, dict]:
    """Grid, compile-time arguments and (empty) compiled-kernel cache of one tile configuration."""
    elems = cfg["ELEMS"]
    cols = min(plan.blocksize, elems)
    n_tiles = triton.cdiv(plan.n, elems)
    per_sm = cfg.get("PER_SM", 0)
    programs = min(n_tiles, per_sm * _sm_count(plan.device)) if per_sm else n_tiles
    meta = {
        "BLOCKSIZE": plan.blocksize,
        "DOUBLE_QUANT": plan.dq,
        "EXACT_MUL": not _INTERPRET,
        "WORDS": bool(cfg["WORDS"] and words_ok),
        "ROWS": elems // cols,
        "COLS": cols,
        "LARGE": plan.n + elems >= 2**31,
        "ODD": plan.n % 2 == 1,
        "FULL": plan.n % cols == 0,
        "PERSIST": programs < n_tiles,
        "num_warps": cfg.get("num_warps", 4),
    }
    return (programs, 1, 1), meta, {}


def _launch_dequant(plan: _DequantPlan, packed: torch.Tensor, out: torch.Tensor, entry) -> None:
    # per call only the packed and output pointers differ (the state's tensors, n and the output
    # dtype are fixed for a plan entry), so their alignment is the whole specialization key
    _launch(
        _dequantize_4bit_kernel,
        entry[0],
        (packed, plan.absmax, plan.nested, plan.ncode, plan.code, out, plan.n, plan.offset_arg),
        entry[1],
        entry[2],
        (packed.data_ptr() % 16 == 0, out.data_ptr() % 16 == 0),
    )


def _dequant_config(
    plan: _DequantPlan, out: torch.Tensor, words_ok: bool, packed: torch.Tensor
) -> dict:
    """The tile configuration for this plan and output (see _DEQUANT_CONFIGS)."""
    if not words_ok:
        return _DEQUANT_CONFIGS[4]
    if plan.n < 1 << 20:
        return _DEQUANT_CONFIGS[3]
    if plan.n < _TUNE_MIN_N or _INTERPRET or not plan.is_cuda:
        return _DEQUANT_CONFIGS[0]
    key = (plan.n, plan.blocksize, plan.dq, out.dtype, plan.device)
    best = _TUNED.get(key)
    if best is None:
        from triton.testing import do_bench

        def timed(cfg: dict) -> float:
            entry = _dequant_meta(plan, cfg, True)
            fn = lambda: _launch_dequant(plan, packed, out, entry)  # noqa: E731
            return do_bench(fn, warmup=5, rep=25, return_mode="median")

        best = _TUNED[key] = min(_TUNE_CONFIGS, key=timed)
    return best


def _dequantize_launch(
    plan: _DequantPlan,
    packed: torch.Tensor,
    state: QuantState,
    out: torch.Tensor | None,
    dtype: torch.dtype | None,
    config: dict | None = None,
) -> torch.Tensor:
    """One launch. ``config`` (tests) forces a tile configuration instead of the table."""
    if not packed.is_contiguous():
        packed = packed.contiguous()
    if out is None:
        out_dtype = plan.dtype if dtype is None else dtype
        if out_dtype not in _backend.FLOAT_DTYPES:
            _check_out(None, dtype, state, packed)
            raise TypeError(f"unsupported output dtype {out_dtype}")  # not reached
        out = torch.empty(plan.shape, dtype=out_dtype, device=plan.device)
    elif not (
        isinstance(out, torch.Tensor)
        and (dtype is None or dtype is out.dtype)
        and out.dtype in _backend.FLOAT_DTYPES
        and out.shape == plan.shape
        and out.device == plan.device
        and out.is_contiguous()
    ):
        _check_out(out, dtype, state, packed)
        raise ValueError("out does not match the quant state")  # not reached
    # word view: two outputs per int32 (16-bit dtypes) or int64 (float32), needs an aligned out
    words_ok = plan.n >= 2 and out.data_ptr() % (2 * _ITEMSIZE[out.dtype]) == 0
    if config is not None:
        _launch_dequant(plan, packed, out, _dequant_meta(plan, config, words_ok))
        return out
    entry = plan.launches.get((out.dtype, words_ok))
    if entry is None:
        cfg = _dequant_config(plan, out, words_ok, packed)
        entry = plan.launches[(out.dtype, words_ok)] = _dequant_meta(plan, cfg, words_ok)
    _launch_dequant(plan, packed, out, entry)
    return out


def _dequantize_4bit_triton(
    packed: torch.Tensor,
    state: QuantState,
    out: torch.Tensor | None,
    dtype: torch.dtype | None,
    config: dict | None = None,
) -> torch.Tensor:
    """The Triton dequantization without backend dispatch (tests: ``config`` forces a tile)."""
    return _dequantize_launch(_plan_for(packed, state), packed, state, out, dtype, config)


# ---- quantize: host path --------------------------------------------------------------------
#
# Loading a model quantizes thousands of weights, every one a new tensor, so nothing may be
# cached on the data; but the weights share a handful of shapes. Everything that depends only on
# (shape, dtype, device, blocksize, quant_type, double quant, backend mode) is worked out once
# per such key into a _QuantPlan: the validation, grids and compile-time arguments, the
# per-device tables and their addresses, the state's constant fields and the compiled kernels.
# A call then costs: one dict lookup, the input's contiguity and address, its allocations (the
# packed weight and the float32 absmax; with double quant also the 8-bit codes and the nested
# scales: separate allocations, as each is a standalone tensor of the state and the float32
# absmax must not outlive the call), the launches of the compiled kernels, torch's mean (double
# quant), and a QuantState whose __dict__ is filled from the plan's template instead of running
# the generated __init__. No host sync, with or without double quant: the one read-back happens
# at the state's first use (QuantState.offset).
#
# Direct launches pass integer addresses: Triton's launcher takes an int pointer argument as it
# is, while for a tensor it calls data_ptr() and asks the driver to check the address
# (cuPointerGetAttribute), per pointer argument and launch (Triton 3.6 and 3.9 alike). The
# compiled kernels are kept per (current device, input 16-byte aligned, input read as words);
# every other argument's specialization is fixed by the plan (n, the tables) or by the
# allocator (outputs are 512-byte aligned; checked per call all the same, a cheap OR of the
# addresses, falling back to the JIT launch).


class _QuantPlan:
    """What quantize_4bit needs for one (shape, dtype, device, blocksize, quant_type, double
    quant) besides the data; ``direct`` holds the compiled kernels (see the comment above)."""

    __slots__ = (
        "n",
        "n_blocks",
        "n_nested",
        "dq",
        "device",
        "packed_shape",
        "even",
        "pair",
        "grid1",
        "meta_words",
        "meta_pairs",
        "grid2",
        "meta2",
        "lookup",
        "lookup_ptr",
        "dmap",
        "dmap_ptr",
        "fields",
        "direct",
    )

    def __init__(
        self, w: torch.Tensor, blocksize: int, quant_type: str, dq: bool, rcp: int | None
    ) -> None:
        if rcp is None:
            rcp = RCP_IEEE if _INTERPRET else GPU_RCP_MODE
        n = w.numel()
        dev = w.device
        self.n = n
        self.n_blocks = -(-n // blocksize)
        self.n_nested = -(-self.n_blocks // NESTED_BLOCKSIZE)
        self.dq = dq
        self.device = dev
        self.packed_shape = ((n + 1) // 2, 1)
        self.even = n % 2 == 0
        self.pair = 2 * w.element_size()
        rows = max(1, _QUANT_ELEMS // blocksize)
        self.grid1 = (-(-self.n_blocks // rows), 1, 1)
        meta = {
            "BLOCKSIZE": blocksize,
            "NF4": quant_type == "nf4",
            "RCP": rcp,
            "EXACT_MUL": not _INTERPRET,
            # read pairs of inputs as one word: even n and an input aligned to a pair
            "IN_WORDS": True,
            "ROWS": rows,
            "FULL": n % blocksize == 0,
            "num_warps": 4,
        }
        self.meta_words = meta
        self.meta_pairs = {**meta, "IN_WORDS": False}
        rows2 = 4  # 1024 scales per program; the whole vector is 1/16 of the packed bytes
        self.grid2 = (-(-self.n_blocks // (rows2 * NESTED_BLOCKSIZE)), 1, 1)
        self.meta2 = {"RCP": rcp, "ROWS": rows2}
        self.lookup = _table("nf4_lookup", dev)
        self.lookup_ptr = self.lookup.data_ptr()
        self.dmap = _table("dynamic", dev)
        self.dmap_ptr = self.dmap.data_ptr()
        # the state's fields that do not depend on the data; code tables are the per-device
        # cached ones (no copy per call)
        self.fields = {
            "shape": w.shape,
            "dtype": w.dtype,
            "blocksize": blocksize,
            "quant_type": quant_type,
            "code": _table(quant_type, dev),
            "nested_absmax": None,
            "nested_code": self.dmap if dq else None,
            "nested_blocksize": NESTED_BLOCKSIZE,
        }
        self.direct: dict[tuple, tuple] = {}


_QUANT_PLANS: dict[tuple, _QuantPlan] = {}
_new_object = object.__new__


def _quantize_call(plan: _QuantPlan, w: torch.Tensor) -> tuple[torch.Tensor, QuantState]:
    """One quantization with a plan. Double quantization: two launches and torch's mean; the
    offset stays on the device and is read back on the state's first use (QuantState.offset),
    which is also when NaN/Inf raise: the first kernel stores NaN as the absmax of such a block,
    so the mean is NaN. Without double quantization: one launch; the finite check (the largest
    absmax, NaN exactly when a block held NaN/Inf) is likewise deferred to the first use.

    Memory: reads n * itemsize, writes n/2 packed bytes + 4 B per block (+ 1 B per block and
    4 B per 256 blocks for double quant); the absmax re-read by the mean and the nested kernel is
    1/16 of the packed size at blocksize 64.
    """
    x = w if w.is_contiguous() else w.detach().contiguous()
    dev = plan.device
    dq = plan.dq
    packed = torch.empty(plan.packed_shape, dtype=torch.uint8, device=dev)
    absmax = torch.empty(plan.n_blocks, dtype=torch.float32, device=dev)
    if dq:
        codes = torch.empty(plan.n_blocks, dtype=torch.uint8, device=dev)
        nested = torch.empty(plan.n_nested, dtype=torch.float32, device=dev)
    px = x.data_ptr()
    words = plan.even and px % plan.pair == 0
    key = None
    launched = False
    if _DIRECT["on"]:
        cur = _driver.active.get_current_device()
        key = (cur, px % 16 == 0, words)
        entry = plan.direct.get(key)
        if entry is not None:
            pp, pa = packed.data_ptr(), absmax.data_ptr()
            stream = _driver.active.get_current_stream(cur)
            try:
                if dq:
                    pc, pn = codes.data_ptr(), nested.data_ptr()
                    if (pp | pa | pc | pn) & 15 == 0:
                        ck, cx = entry[0]
                        ck[plan.grid1](px, pp, pa, plan.lookup_ptr, plan.n, *cx, stream=stream)
                        offset = absmax.mean()  # torch's float32 mean, as bitsandbytes computes it
                        po = offset.data_ptr()
                        if po & 15 == 0:
                            ck, cx = entry[1]
                            ck[plan.grid2](
                                pa, po, pc, pn, plan.dmap_ptr, plan.n_blocks, *cx, stream=stream
                            )
                        else:  # never seen (the allocator aligns to 512 B): the JIT launch
                            _quantize_absmax_kernel[plan.grid2](
                                absmax, offset, codes, nested, plan.dmap, plan.n_blocks,
                                **plan.meta2,
                            )  # fmt: skip
                        launched = True
                elif (pp | pa) & 15 == 0:
                    ck, cx = entry[0]
                    ck[plan.grid1](px, pp, pa, plan.lookup_ptr, plan.n, *cx, stream=stream)
                    launched = True
            except Exception:
                _DIRECT["on"] = False
    if not launched:
        meta = plan.meta_words if words else plan.meta_pairs
        ck1 = _quantize_4bit_kernel[plan.grid1](x, packed, absmax, plan.lookup, plan.n, **meta)
        ck2 = None
        if dq:
            offset = absmax.mean()  # torch's float32 mean, as bitsandbytes computes it
            args2 = (absmax, offset, codes, nested, plan.dmap, plan.n_blocks)
            ck2 = _quantize_absmax_kernel[plan.grid2](*args2, **plan.meta2)
        if key is not None and _DIRECT["on"]:
            outs = [packed, absmax] + ([codes, nested, offset] if dq else [])
            if all(t.data_ptr() % 16 == 0 for t in outs):
                e1 = _direct_entry(_quantize_4bit_kernel, ck1, 5, meta)
                e2 = _direct_entry(_quantize_absmax_kernel, ck2, 6, plan.meta2) if dq else None
                if e1 is not None and (e2 is not None or not dq):
                    plan.direct[key] = (e1, e2)
    state = _new_object(QuantState)
    d = state.__dict__
    d.update(plan.fields)
    if dq:
        d["absmax"] = codes
        d["nested_absmax"] = nested
        d["_pending_offset"] = offset  # read back on first use (_resolve_offset)
    else:
        d["absmax"] = absmax
        d["_pending_offset"] = absmax  # checked for NaN on first use (_resolve_offset)
    if w.is_cuda:  # the stream the first use must wait for, if it runs on another one
        d["_pending_stream"] = torch.cuda.current_stream(w.device)
    return packed, state


def _quantize_4bit_triton(
    w: torch.Tensor,
    blocksize: int,
    quant_type: str,
    compress_statistics: bool,
    rcp_mode: int | None = None,
) -> tuple[torch.Tensor, QuantState]:
    """The Triton quantization without backend dispatch or input checks (tests: ``rcp_mode``
    picks the reciprocal, see RCP_IEEE ...)."""
    dq = bool(compress_statistics)
    key = (w.shape, w.dtype, w.device, blocksize, quant_type, dq, "rcp", rcp_mode)
    plan = _QUANT_PLANS.get(key)
    if plan is None:
        plan = _QUANT_PLANS[key] = _QuantPlan(w, blocksize, quant_type, dq, rcp_mode)
    return _quantize_call(plan, w)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def quantize_4bit(
    w: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4", compress_statistics: bool = True
) -> tuple[torch.Tensor, QuantState]:
    """Quantize ``w`` (float32/float16/bfloat16, any shape) to packed 4-bit NF4 or FP4.

    Returns ``(packed uint8 [(n + 1) // 2, 1], state)``, bit-identical to
    ``bitsandbytes.functional.quantize_4bit`` with the same arguments. ``compress_statistics``
    turns on double quantization of the block scales.
    """
    # Repeated shapes (loading a model) skip the checks: a plan exists only for a key whose
    # first call passed them and chose the Triton path, and the key holds everything they read.
    try:
        key = (w.shape, w.dtype, w.device, blocksize, quant_type, compress_statistics, _mode())
        plan = _QUANT_PLANS.get(key)
    except (AttributeError, TypeError):  # not a tensor, or an unhashable argument
        key = plan = None
    if plan is not None:
        return _quantize_call(plan, w)
    _check_weight(w, blocksize, quant_type)
    if not _backend.use_triton(w):
        return quantize_4bit_ref(w, blocksize, quant_type, compress_statistics)
    plan = _QuantPlan(w, blocksize, quant_type, bool(compress_statistics), None)
    if key is not None:
        _QUANT_PLANS[key] = plan
    return _quantize_call(plan, w)


def dequantize_4bit(
    packed: torch.Tensor,
    state: QuantState,
    out: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Dequantize to ``dtype`` (default ``state.dtype``) with ``state.shape``.

    ``out``, if given, is a contiguous buffer of ``state.shape`` that receives the result (its
    dtype is the output dtype). One Triton launch on CUDA, double quantization included. The
    state is fully validated on its first use and when any of its fields has been reassigned
    since; later calls check only ``packed`` and ``out`` (see ``_DequantPlan``).
    """
    plan = _plan_for(packed, state)
    mode = _backend.get_backend()
    if (mode == "auto" and plan.is_cuda) or (mode == "triton" and _backend.use_triton(packed)):
        return _dequantize_launch(plan, packed, state, out, dtype)
    return dequantize_4bit_ref(packed, state, out, dtype)
