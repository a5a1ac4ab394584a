"""8-bit AdamW: both moments stored as blockwise dynamically quantized 8-bit codes.

State format (per parameter with at least ``min_8bit_size`` elements; the layout bitsandbytes'
8-bit blockwise Adam uses, built here from its description):

* The parameter is flattened row-major and cut into blocks of ``blocksize`` (default 256)
  consecutive elements; the last block may be short.
* First moment m: uint8 codes into the *signed* dynamic map (256 float32 values in [-1, 1]: for
  i = 0..6 the 2^i midpoints of ``linspace(0.1, 1, 2^i + 1)`` scaled by 10^(i-6), both signs, plus
  0 and 1), with one float32 ``absmax = max |m|`` per block. ``m = map[code] * absmax``.
* Second moment v >= 0: codes into the *unsigned* dynamic map (the same construction with 2^(i+1)
  midpoints per decade and no negative half: 254 values plus 0 and 1), float32 absmax per block.
* Encoding a value x of a block with scale s: the code is the number of the 255 float32 midpoints
  ``mid[j] = (map[j] + map[j+1]) / 2`` with ``x > mid[j] * s`` (products rounded to float32). This
  is the nearest map entry to x / s up to the rounding of the thresholds, and it needs no division,
  so the kernel and the reference agree bit for bit.
* Smaller parameters keep float32 ``exp_avg`` / ``exp_avg_sq`` like torch's AdamW.

Memory: 2 bytes of state per parameter plus 8 bytes of absmax per 256 elements (2.03 B/param),
against 8 B/param for float32 AdamW states.

Step, per element, all in float32 from the float32 constants b1, 1-b1, b2, 1-b2 (each rounded
once from the Python floats), with t the step count after this step:

    m  = b1 * dequant(m) + (1 - b1) * g
    v  = b2 * dequant(v) + (1 - b2) * (g * g)
    p  = p * (1 - lr * wd) - (lr / bc1) * (m / (sqrt(v) / sqrt(bc2) + eps))
    bc1 = 1 - exp2(t * log2(b1)),  bc2 = 1 - exp2(t * log2(b2))
    then m and v are re-encoded (new absmax per block).

The update uses the unquantized new moments (registers), so quantization error enters only
through the stored state of the next step. Weight decay is decoupled (AdamW). The three roundings
of each moment update are kept separate (the kernel is compiled without fused multiply-add) and
divisions/square roots are IEEE, so the GPU kernel reproduces the reference's codes exactly; the
bias corrections use exp2, which may differ in the last bit between devices (relative 1e-7 on
the update). Parameters are updated in their own dtype: float32, or bfloat16/float16 rounded once
per step (no master weights, no stochastic rounding).

Non-finite gradients: before any update, one float32 L2 norm per gradient is taken (one
multi-tensor launch). If any is inf or NaN (a gradient with inf/NaN, or one so large its float32
sum of squares overflows, |g| beyond ~1e16), the whole step is skipped on that device: no
parameter, moment or step counter changes. The decision stays on the device (a 0/1 tensor the
kernels read), so ``step()`` never synchronizes with the host. This is the GradScaler policy
rather than bitsandbytes' (which zeroes the states of affected elements): a skipped step leaves
the optimizer exactly as it was.

Limits: parameters float32/float16/bfloat16 on CUDA (Triton kernel, one launch per parameter) or
CPU (reference path); dense gradients only; blocksize a power of two in 64..4096; no amsgrad,
maximize, or tensor learning rates; gradients whose square overflows float32 are treated as
non-finite (the step is skipped).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

import torch
import triton
import triton.language as tl

from qkern._backend import next_power_of_2, num_sms
from qkern._backend import use_triton as _use_triton

BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)
_PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_QUANT_KEYS = ("exp_avg_q", "exp_avg_absmax", "exp_avg_sq_q", "exp_avg_sq_absmax")
_FP32_KEYS = ("exp_avg", "exp_avg_sq")
# code of 0.0 in the signed map (127 negative values sort below it)
_SIGNED_ZERO_CODE = 127


# ----------------------------------------------------------------------------------------------
# dynamic maps
# ----------------------------------------------------------------------------------------------


@lru_cache(maxsize=2)
def _dynamic_map_cpu(signed: bool) -> torch.Tensor:
    values: list[float] = []
    for i in range(7):
        # signed: 2^i values per decade and sign; unsigned: 2^(i+1) per decade, positive only
        n = 2**i + 1 if signed else 2 ** (i + 1) + 1
        bounds = torch.linspace(0.1, 1, n, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        # Python-scalar times float32 tensor, listed, sorted, stored as float32: the steps
        # bitsandbytes uses, so every entry is the same float32 value.
        values += (10 ** (i - 6) * means).tolist()
        if signed:
            values += (-(10 ** (i - 6)) * means).tolist()
    values += [0.0, 1.0]
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_map(signed: bool = True) -> torch.Tensor:
    """The 256-entry float32 dynamic map (sorted): signed for m, unsigned for v (CPU copy)."""
    return _dynamic_map_cpu(bool(signed)).clone()


@lru_cache(maxsize=2)
def _midpoints_cpu(signed: bool) -> torch.Tensor:
    q = _dynamic_map_cpu(signed)
    return (q[:-1] + q[1:]) / 2.0  # 255 float32 thresholds, strictly increasing


_device_tables: dict[tuple[str, bool], tuple[torch.Tensor, torch.Tensor]] = {}


def _tables(device: torch.device, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(map [256], midpoints [255]) float32 on ``device``, cached per device."""
    key = (str(device), signed)
    if key not in _device_tables:
        _device_tables[key] = (
            _dynamic_map_cpu(signed).to(device),
            _midpoints_cpu(signed).to(device),
        )
    return _device_tables[key]


# ----------------------------------------------------------------------------------------------
# blockwise 8-bit quantization (reference)
# ----------------------------------------------------------------------------------------------


def _check_blocksize(blocksize: int) -> None:
    if not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")


def quantize_blockwise_ref(
    x: torch.Tensor, blocksize: int = 256, signed: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode ``x`` (any shape, flattened) to (uint8 codes [n], float32 absmax [ceil(n/bs)]).

    code = #{j : x > mid[j] * absmax_block}, the map entry nearest to x / absmax up to the
    float32 rounding of the thresholds. With ``signed=False`` x must be >= 0.
    """
    _check_blocksize(blocksize)
    flat = x.detach().reshape(-1).to(torch.float32)
    n = flat.numel()
    nb = triton.cdiv(n, blocksize)
    padded = torch.zeros(nb * blocksize, dtype=torch.float32, device=flat.device)
    padded[:n] = flat
    blocks = padded.view(nb, blocksize)
    absmax = blocks.abs().amax(dim=1)
    _, mid = _tables(flat.device, signed)
    thresholds = mid[None, :] * absmax[:, None]  # (nb, 255), non-decreasing along a row
    # searchsorted (left) counts the thresholds strictly below each value
    codes = torch.searchsorted(thresholds, blocks.contiguous()).to(torch.uint8)
    return codes.reshape(-1)[:n], absmax


def dequantize_blockwise_ref(
    codes: torch.Tensor, absmax: torch.Tensor, blocksize: int = 256, signed: bool = True
) -> torch.Tensor:
    """float32 [n] values ``map[code] * absmax[block]`` (one rounding)."""
    _check_blocksize(blocksize)
    qmap, _ = _tables(codes.device, signed)
    n = codes.numel()
    scale = absmax.to(torch.float32).repeat_interleave(blocksize)[:n]
    return qmap[codes.reshape(-1).long()] * scale


# ----------------------------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _search_step(x, thr_scale, MID, code, HALF: tl.constexpr):
    """One binary-search step: move up by HALF where x is above threshold code + HALF - 1."""
    thr = tl.load(MID + code + (HALF - 1)) * thr_scale
    return tl.where(x > thr, code + HALF, code)


@triton.jit
def _encode(x, absmax, MID):
    """Codes of x [R, C] against per-row scales absmax [R]: the count of the 255 sorted
    thresholds mid[j] * absmax_r below x, by an 8-step binary search (gathers from a 1 KB table
    that stays in L1). The largest index read is 254."""
    scale = absmax[:, None]
    code = tl.full(x.shape, 0, tl.int32)
    code = _search_step(x, scale, MID, code, 128)
    code = _search_step(x, scale, MID, code, 64)
    code = _search_step(x, scale, MID, code, 32)
    code = _search_step(x, scale, MID, code, 16)
    code = _search_step(x, scale, MID, code, 8)
    code = _search_step(x, scale, MID, code, 4)
    code = _search_step(x, scale, MID, code, 2)
    code = _search_step(x, scale, MID, code, 1)
    return code


@triton.jit
def _adamw8bit_kernel(
    P,
    G,
    M,
    V,
    M_ABSMAX,
    V_ABSMAX,
    M_QMAP,
    M_MID,
    V_QMAP,
    V_MID,
    STEP,
    SKIP,
    n,
    n_blocks,
    lr,
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    log2_beta1,
    log2_beta2,
    eps,
    decay,
    QBLOCK: tl.constexpr,
    BLOCKS: tl.constexpr,
    QUANT: tl.constexpr,
):
    """One AdamW step for BLOCKS quantization blocks of QBLOCK elements (see the module
    docstring for the math). QUANT: m/v are uint8 codes + float32 absmax per block (re-encoded
    after the update); otherwise float32 arrays (QBLOCK is then only the tile width).
    SKIP (float32 0/1): when 1 nothing is stored. STEP: the step count after this step."""
    pid = tl.program_id(0)
    rows = pid * BLOCKS + tl.arange(0, BLOCKS)
    cols = tl.arange(0, QBLOCK)
    offs = rows.to(tl.int64)[:, None] * QBLOCK + cols[None, :]
    mask = offs < n
    keep = tl.load(SKIP + tl.zeros([BLOCKS], tl.int32)) == 0.0  # the flag, once per row
    smask = mask & keep[:, None]
    rmask = (rows < n_blocks) & keep

    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(P + offs, mask=mask, other=0.0).to(tl.float32)
    if QUANT:
        m_code = tl.load(M + offs, mask=mask, other=0).to(tl.int32)
        v_code = tl.load(V + offs, mask=mask, other=0).to(tl.int32)
        m_scale = tl.load(M_ABSMAX + rows, mask=rows < n_blocks, other=0.0)
        v_scale = tl.load(V_ABSMAX + rows, mask=rows < n_blocks, other=0.0)
        m = tl.load(M_QMAP + m_code) * m_scale[:, None]
        v = tl.load(V_QMAP + v_code) * v_scale[:, None]
    else:
        m = tl.load(M + offs, mask=mask, other=0.0)
        v = tl.load(V + offs, mask=mask, other=0.0)

    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + one_minus_beta2 * (g * g)

    t = tl.load(STEP)
    bc1 = 1.0 - tl.exp2(t * log2_beta1)
    bc2 = 1.0 - tl.exp2(t * log2_beta2)
    step_size = tl.div_rn(lr, bc1)
    denom = tl.div_rn(tl.sqrt_rn(v), tl.sqrt_rn(bc2)) + eps
    p = p * decay - step_size * tl.div_rn(m, denom)
    tl.store(P + offs, p.to(P.dtype.element_ty), mask=smask)

    if QUANT:
        m_abs = tl.max(tl.where(mask, tl.abs(m), 0.0), axis=1)
        v_abs = tl.max(tl.where(mask, v, 0.0), axis=1)
        tl.store(M + offs, _encode(m, m_abs, M_MID).to(tl.uint8), mask=smask)
        tl.store(V + offs, _encode(v, v_abs, V_MID).to(tl.uint8), mask=smask)
        tl.store(M_ABSMAX + rows, m_abs, mask=rmask)
        tl.store(V_ABSMAX + rows, v_abs, mask=rmask)
    else:
        tl.store(M + offs, m, mask=smask)
        tl.store(V + offs, v, mask=smask)


# ----------------------------------------------------------------------------------------------
# one parameter: launcher and reference
# ----------------------------------------------------------------------------------------------


def _f32(x: float) -> float:
    """x rounded once to float32 (what a float kernel argument receives)."""
    return float(torch.tensor(x, dtype=torch.float32))


@lru_cache(maxsize=64)
def _constants(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> dict:
    """The float32 scalars both paths use, each rounded once from float64."""
    b1, b2 = betas
    return dict(
        lr=_f32(lr),
        beta1=_f32(b1),
        one_minus_beta1=_f32(1.0 - b1),
        beta2=_f32(b2),
        one_minus_beta2=_f32(1.0 - b2),
        # log2(0) = -inf gives bc = 1 - exp2(-inf) = 1: beta = 0 means no bias correction needed
        log2_beta1=_f32(math.log2(b1)) if b1 > 0 else -math.inf,
        log2_beta2=_f32(math.log2(b2)) if b2 > 0 else -math.inf,
        eps=_f32(eps),
        decay=_f32(1.0 - lr * weight_decay),
    )


def _elements_per_program(n: int, device: torch.device) -> int:
    # Memory-bound (about 16 B per element for fp32 params: p r/w 8, g 4, codes r/w 4): enough
    # elements per program to amortize the per-block absmax and table loads, and enough programs
    # (two per SM) to fill the card on LoRA-sized tensors (16 x 4096 = 64 K elements -> 128
    # programs of 512). Not autotuned: the kernel updates its arguments in place, so timing
    # candidates would apply the step several times.
    return max(256, min(4096, next_power_of_2(triton.cdiv(n, 2 * num_sms(device)))))


def _launch(
    p: torch.Tensor, g: torch.Tensor, state: dict, c: dict, blocksize: int, skip: torch.Tensor
) -> None:
    n = p.numel()
    quant = "exp_avg_q" in state
    if quant:
        qblock = blocksize
        m, v = state["exp_avg_q"], state["exp_avg_sq_q"]
        m_absmax, v_absmax = state["exp_avg_absmax"], state["exp_avg_sq_absmax"]
        m_qmap, m_mid = _tables(p.device, True)
        v_qmap, v_mid = _tables(p.device, False)
    else:
        qblock = 256
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m_absmax = v_absmax = m_qmap = m_mid = v_qmap = v_mid = m  # unused placeholders
    blocks = max(1, _elements_per_program(n, p.device) // qblock)
    n_blocks = triton.cdiv(n, qblock)
    grid = (triton.cdiv(n_blocks, blocks),)
    _adamw8bit_kernel[grid](
        p, g, m, v, m_absmax, v_absmax, m_qmap, m_mid, v_qmap, v_mid, state["step"], skip,
        n, n_blocks, c["lr"], c["beta1"], c["one_minus_beta1"], c["beta2"], c["one_minus_beta2"],
        c["log2_beta1"], c["log2_beta2"], c["eps"], c["decay"],
        QBLOCK=qblock, BLOCKS=blocks, QUANT=quant,
        num_warps=4 if qblock * blocks >= 1024 else 2, enable_fp_fusion=False,
    )  # fmt: skip


def _sqrt_f32(x: torch.Tensor) -> torch.Tensor:
    return x.double().sqrt().to(torch.float32)


def adamw8bit_step_ref(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    blocksize: int,
    skip: torch.Tensor | None = None,
) -> None:
    """The same step as the kernel in plain PyTorch (CPU path and test oracle), in place.

    ``state["step"]`` already holds the count after this step; ``skip`` (0/1 tensor) leaves
    everything unchanged when 1.
    """
    if skip is not None and bool(skip):
        return
    c = {k: torch.tensor(v, dtype=torch.float32, device=param.device) for k, v in
         _constants(lr, tuple(betas), eps, weight_decay).items()}  # fmt: skip
    n = param.numel()
    g = grad.detach().reshape(-1).to(torch.float32)
    p = param.detach().reshape(-1).to(torch.float32)
    quant = "exp_avg_q" in state
    if quant:
        m = dequantize_blockwise_ref(state["exp_avg_q"], state["exp_avg_absmax"], blocksize, True)
        v = dequantize_blockwise_ref(
            state["exp_avg_sq_q"], state["exp_avg_sq_absmax"], blocksize, False
        )
    else:
        m, v = state["exp_avg"], state["exp_avg_sq"]
    m = c["beta1"] * m + c["one_minus_beta1"] * g
    v = c["beta2"] * v + c["one_minus_beta2"] * (g * g)
    t = state["step"].to(torch.float32)
    bc1 = 1.0 - torch.exp2(t * c["log2_beta1"])
    bc2 = 1.0 - torch.exp2(t * c["log2_beta2"])
    step_size = c["lr"] / bc1
    # torch's vectorized float32 sqrt on CPU is not correctly rounded; the float64 root rounded
    # once to float32 is (53 >= 2 * 24 + 2 bits), and equals the kernel's IEEE sqrt_rn
    denom = _sqrt_f32(v) / _sqrt_f32(bc2) + c["eps"]
    p = p * c["decay"] - step_size * (m / denom)
    param.data.copy_(p.view(param.shape).to(param.dtype))
    if quant:
        state["exp_avg_q"], state["exp_avg_absmax"] = quantize_blockwise_ref(m, blocksize, True)
        state["exp_avg_sq_q"], state["exp_avg_sq_absmax"] = quantize_blockwise_ref(
            v, blocksize, False
        )
        assert state["exp_avg_q"].numel() == n
    else:
        state["exp_avg"].copy_(m)
        state["exp_avg_sq"].copy_(v)


def adamw8bit_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    blocksize: int,
    skip: torch.Tensor,
) -> None:
    """One step for one parameter: the Triton kernel on CUDA (or under the interpreter when
    forced), else :func:`adamw8bit_step_ref`. Same contract as the reference."""
    if not _use_triton(param, grad):
        adamw8bit_step_ref(
            param, grad, state, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
            blocksize=blocksize, skip=skip,
        )  # fmt: skip
        return
    c = _constants(lr, tuple(betas), eps, weight_decay)
    g = grad.detach().contiguous()
    if param.is_contiguous():
        _launch(param.detach(), g, state, c, blocksize, skip)
    else:
        work = param.detach().contiguous()
        _launch(work, g, state, c, blocksize, skip)
        param.data.copy_(work)


# ----------------------------------------------------------------------------------------------
# the optimizer
# ----------------------------------------------------------------------------------------------


def _nonfinite_flag(grads: list[torch.Tensor]) -> torch.Tensor:
    """float32 0-dim tensor: 1.0 when any gradient's float32 L2 norm is inf/NaN, else 0.0.

    One multi-tensor norm per dtype (a handful of launches for hundreds of tensors) and no host
    synchronization: the kernels read the flag.
    """
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = defaultdict(list)
    for g in grads:
        by_dtype[g.dtype].append(g)
    finite = [torch.stack(torch._foreach_norm(gs)).isfinite().all() for gs in by_dtype.values()]
    all_finite = finite[0] if len(finite) == 1 else torch.stack(finite).all()
    return (~all_finite).to(torch.float32)


class AdamW8bit(torch.optim.Optimizer):
    """AdamW with 8-bit blockwise-quantized moments (module docstring: format, math, policy).

    Args:
        params: parameters or parameter groups (float32/float16/bfloat16).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (weight decay is decoupled; the
            default here is 0.0).
        blocksize: elements per quantization block (power of two, 64..4096).
        min_8bit_size: parameters with fewer elements keep float32 moments.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        blocksize: int = 256,
        min_8bit_size: int = 4096,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            blocksize=blocksize,
            min_8bit_size=min_8bit_size,
        )
        _check_hparams(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_hparams(group)
        for p in group["params"]:
            if not p.is_floating_point() or p.dtype not in _PARAM_DTYPES:
                raise TypeError(
                    f"AdamW8bit params must be float32, float16 or bfloat16, got {p.dtype}"
                )

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        state = self.state[p]
        if state:
            return state
        n = p.numel()
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        if n >= group["min_8bit_size"]:
            nb = triton.cdiv(n, group["blocksize"])
            state["exp_avg_q"] = torch.full(
                (n,), _SIGNED_ZERO_CODE, dtype=torch.uint8, device=p.device
            )
            state["exp_avg_absmax"] = torch.zeros(nb, dtype=torch.float32, device=p.device)
            state["exp_avg_sq_q"] = torch.zeros(n, dtype=torch.uint8, device=p.device)
            state["exp_avg_sq_absmax"] = torch.zeros(nb, dtype=torch.float32, device=p.device)
        else:
            state["exp_avg"] = torch.zeros(n, dtype=torch.float32, device=p.device)
            state["exp_avg_sq"] = torch.zeros(n, dtype=torch.float32, device=p.device)
        return state

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work: dict[torch.device, list[tuple[dict, torch.Tensor]]] = defaultdict(list)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or p.numel() == 0:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW8bit does not support sparse gradients")
                self._init_state(p, group)
                work[p.device].append((group, p))
        for items in work.values():
            skip = _nonfinite_flag([p.grad for _, p in items])
            keep = 1.0 - skip
            # the step counters advance on the device by 1 - skip (no host synchronization)
            torch._foreach_add_([self.state[p]["step"] for _, p in items], [keep] * len(items))
            for group, p in items:
                adamw8bit_step(
                    p, p.grad, self.state[p], lr=group["lr"], betas=group["betas"],
                    eps=group["eps"], weight_decay=group["weight_decay"],
                    blocksize=group["blocksize"], skip=skip,
                )  # fmt: skip
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`, keeping the float32 states in float32.

        ``torch.optim.Optimizer.load_state_dict`` casts floating-point state to the parameter's
        dtype (it assumes moments live in the parameter dtype); ours are float32 by design
        (absmax, small-tensor moments, step), so they are restored from the saved tensors.
        """
        saved_state = state_dict["state"]
        saved_groups = state_dict["param_groups"]
        super().load_state_dict(state_dict)
        for saved_group, group in zip(saved_groups, self.param_groups):
            for pid, p in zip(saved_group["params"], group["params"]):
                if pid not in saved_state:
                    continue
                st = self.state[p]
                for key, value in saved_state[pid].items():
                    if isinstance(value, torch.Tensor):
                        dtype = torch.float32 if value.is_floating_point() else value.dtype
                        # a copy: stepping must not write into the caller's state_dict
                        st[key] = value.detach().to(device=p.device, dtype=dtype).clone()
                _check_loaded_state(st, p, group)


def _check_loaded_state(st: dict, p: torch.Tensor, group: dict) -> None:
    n = p.numel()
    if "step" not in st:
        raise ValueError("loaded state has no 'step'")
    if "exp_avg_q" in st:
        nb = triton.cdiv(n, group["blocksize"])
        shapes = {k: tuple(st[k].shape) for k in _QUANT_KEYS}
        want = {"exp_avg_q": (n,), "exp_avg_sq_q": (n,)}
        want.update(exp_avg_absmax=(nb,), exp_avg_sq_absmax=(nb,))
        if shapes != want or st["exp_avg_q"].dtype != torch.uint8:
            raise ValueError(
                f"loaded 8-bit state does not fit a parameter of {n} elements with blocksize "
                f"{group['blocksize']}: shapes {shapes}, expected {want}"
            )
    elif all(k in st for k in _FP32_KEYS):
        if any(st[k].numel() != n for k in _FP32_KEYS):
            raise ValueError(f"loaded 32-bit state does not fit a parameter of {n} elements")
    else:
        raise ValueError(f"loaded state has unknown keys {sorted(st)}")
    st["step"] = st["step"].reshape(())


def _check_hparams(h: dict) -> None:
    lr, betas, eps, wd = h["lr"], h["betas"], h["eps"], h["weight_decay"]
    if isinstance(lr, torch.Tensor) or not isinstance(lr, (int, float)) or not lr >= 0.0:
        raise ValueError(f"lr must be a float >= 0, got {lr!r}")
    if (
        not isinstance(betas, (tuple, list))
        or len(betas) != 2
        or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas)
    ):
        raise ValueError(f"betas must be two floats in [0, 1), got {betas!r}")
    if not isinstance(eps, (int, float)) or not eps >= 0.0:
        raise ValueError(f"eps must be a float >= 0, got {eps!r}")
    if not isinstance(wd, (int, float)) or not wd >= 0.0:
        raise ValueError(f"weight_decay must be a float >= 0, got {wd!r}")
    _check_blocksize(h["blocksize"])
    ms = h["min_8bit_size"]
    if not isinstance(ms, int) or isinstance(ms, bool) or ms < 0:
        raise ValueError(f"min_8bit_size must be an int >= 0, got {ms!r}")
