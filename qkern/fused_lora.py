"""Fused QLoRA blocks: the LoRA MLP (gate/up -> SwiGLU -> down) and the LoRA QKV projection.

Each projection P is a :class:`qkern.qlora.QLoRALinear`: a frozen 4-bit weight W (out x in),
an optional adapter A (r x in), B (out x r) with scale s, an optional bias:

    P(z) = z·Wᵀ + s·(z·Aᵀ)·Bᵀ (+ bias)

    lora_qkv(x) = (Pq(x), Pk(x), Pv(x))
    lora_mlp(x) = Pd(h),   h = silu(g) * u,   g = Pg(x),   u = Pu(x)

Backward of one projection, with dy its output gradient and t = z·Aᵀ saved from the forward:

    dz = dy·W + (s·dy·B)·A        dA = (s·dy·B)ᵀ·z        dB = s·dyᵀ·t        dbias = Σ_rows dy

**What is saved.** Both blocks are one ``torch.autograd.Function`` that saves only x and the
adapters' r-wide projections t (M x r per projection: 256 KiB at M=8192, r=16, bf16). The MLP
block's backward recomputes g and u (two x·Wᵀ GEMMs, reusing the saved t) instead of keeping
them. For Llama-3-8B shapes (M=8192 tokens, hidden 4096, intermediate 14336, bf16) the unfused
chain ``down(swiglu(gate(x), up(x)))`` keeps g, u (for SwiGLU's backward) and h (for down's
backward): 3 x 8192 x 14336 x 2 B = 704 MB per layer, 11x the layer input x (64 MiB). The
fused block keeps x (already held by the caller as the residual stream) plus 3 x 256 KiB.

**What it costs.** Recomputing g and u is two of the block's eight big GEMMs (forward: 3,
backward: dh, dx from g, dx from u, plus the 2 recomputed): about +33% of the MLP's matmul time
(at ~700 TFLOP/s, 2 x 0.96 TFLOP = ~2.7 ms per layer). ``recompute=False`` keeps g and u instead
(2/3 of the unfused chain's memory, no extra GEMMs): the better choice when the trainer already
checkpoints whole layers (then the block's saved tensors live only during one layer's backward).

**Weights.** Every frozen weight is dequantized, right before the GEMM that uses it, into the
shared workspace of :func:`qkern.qlora.dequant_workspace` (one buffer per device and dtype, sized
for the largest weight, reused by every layer and by ``qlora_linear``): no per-layer allocation.
Forward dequantizes Wg, Wu, Wd once each; backward Wd, then Wg and Wu to recompute g and u, then
dx uses Wu still in the buffer and dequantizes Wg again: 4 dequantizations; a 14336 x 4096 NF4
dequant writes 117 MB (~50 µs at 3 TB/s), under 1% of the block.

**Shared input.** q/k/v (and gate/up) read the same x: their adapters are stacked so that x·Aᵀ
for all of them is one skinny GEMM (reads x once), and in the backward both
dA = (s·dy·B)ᵀ·x and the adapters' part of dx are one GEMM each over the stacked ranks. dx is
accumulated in one buffer with beta=1 GEMMs instead of autograd summing three dx tensors.

Limits: lora_dropout must be 0 while training (the fused blocks do not draw dropout masks;
ValueError otherwise; use the unfused modules). Compute dtype is x.dtype (float16, bfloat16,
float32); adapters and biases may be float32 or x.dtype and get gradients in their own dtype;
a bias gets a gradient only if it requires grad. For M <= ``qlora.NF4_MATMUL_MAX_M`` rows
(decode) the blocks call the modules unfused, whose small-M kernel reads the packed weight
directly. The workspace assumes one CUDA stream per device (as ``qlora_linear`` does).
"""

from __future__ import annotations

import torch
from torch.autograd.graph import increment_version

from qkern._backend import check_float, check_same_device
from qkern._backend import use_triton as _use_triton
from qkern.qlora import NF4_MATMUL_MAX_M, dequant_workspace, qlora_linear_ref
from qkern.swiglu import swiglu, swiglu_backward_2d, swiglu_forward_2d, swiglu_ref

# ----------------------------------------------------------------------------------------------
# one projection's pieces (2-D z [M, in]; compute dtype dt)
# ----------------------------------------------------------------------------------------------


class _Proj:
    """The frozen part of a QLoRALinear as the autograd Function needs it (no tensors that
    require grad: those go through ``apply`` so autograd sees them)."""

    __slots__ = ("packed", "state", "scaling", "n", "k", "has_lora")

    def __init__(self, module: torch.nn.Module) -> None:
        self.packed = module.packed
        self.state = module.quant_state
        self.scaling = float(module.scaling)
        self.n, self.k = (int(d) for d in module.quant_state.shape)
        self.has_lora = module.lora_A is not None


def _project(
    z: torch.Tensor,
    proj: _Proj,
    t: torch.Tensor | None,
    b: torch.Tensor | None,
    bias: torch.Tensor | None,
    w: torch.Tensor | None = None,
) -> torch.Tensor:
    """z·Wᵀ + s·t·Bᵀ (+ bias) with t = z·Aᵀ given; W is dequantized into the workspace unless
    given. The skinny adapter GEMM writes the output and the big GEMM accumulates into it
    (beta=1), so there is no separate add pass."""
    dt = z.dtype
    if w is None:
        w = dequant_workspace(proj.packed, proj.state, dt)
    if t is None:
        return torch.addmm(bias.to(dt), z, w.t()) if bias is not None else z @ w.t()
    if bias is not None:
        y = torch.addmm(bias.to(dt), t, b.to(dt).t(), alpha=proj.scaling)
    else:
        y = torch.empty(z.shape[0], proj.n, dtype=dt, device=z.device)
        y.addmm_(t, b.to(dt).t(), beta=0, alpha=proj.scaling)
    y.addmm_(z, w.t())
    return y


def _stacked_a(projs: list[_Proj], a_list: list, dt: torch.dtype) -> torch.Tensor | None:
    """[A_1; A_2; ...] (sum of ranks x in) in dt over the projections that have an adapter."""
    parts = [a.to(dt) for p, a in zip(projs, a_list) if p.has_lora]
    return torch.cat(parts, 0) if parts else None


def _split_t(t_all: torch.Tensor | None, projs: list[_Proj], a_list: list) -> list:
    """Column slices of the stacked t = x·[A_1; A_2; ...]ᵀ, one per projection (None if none)."""
    out, col = [], 0
    for p, a in zip(projs, a_list):
        if p.has_lora:
            r = a.shape[0]
            out.append(t_all[:, col : col + r])
            col += r
        else:
            out.append(None)
    return out


def _shared_input_backward(
    x2: torch.Tensor,
    dys: list[torch.Tensor],
    projs: list[_Proj],
    a_list: list,
    b_list: list,
    bias_list: list,
    t_list: list,
    need_x: bool,
    need_a: list[bool],
    need_b: list[bool],
    need_bias: list[bool],
    dequant_order: list[int] | None = None,
    dequantized: dict[int, torch.Tensor] | None = None,
):
    """Gradients of y_i = P_i(x) for projections sharing x, given dy_i.

    u_i = s_i·dy_i·B_i is stacked into U (M x sum r): dA = Uᵀ·x (one GEMM over all adapters),
    dx = U·[A_1; ...] + Σ dy_i·W_i accumulated in one buffer, the W_i used in ``dequant_order``;
    ``dequantized`` maps a projection index to its W still valid in the workspace (callers put it
    first in the order, so it is used before the workspace is overwritten).
    """
    dt = x2.dtype
    m = x2.shape[0]
    u_parts = []
    for p, b, dy in zip(projs, b_list, dys):
        if p.has_lora:
            u_parts.append((dy @ b.to(dt)).mul_(p.scaling))
    u_all = torch.cat(u_parts, 1) if u_parts else None  # [M, sum r], scaled

    da_list = [None] * len(projs)
    db_list = [None] * len(projs)
    dbias_list = [None] * len(projs)
    if u_all is not None and any(need_a):
        da_all = u_all.t() @ x2  # [sum r, in]
        col = 0
        for i, (p, a) in enumerate(zip(projs, a_list)):
            if p.has_lora:
                r = a.shape[0]
                if need_a[i]:
                    da_list[i] = da_all[col : col + r].to(a.dtype)
                col += r
    for i, (p, b, dy, t) in enumerate(zip(projs, b_list, dys, t_list)):
        if p.has_lora and need_b[i]:
            db = torch.empty(p.n, t.shape[1], dtype=dt, device=x2.device)
            db.addmm_(dy.t(), t, beta=0, alpha=p.scaling)
            db_list[i] = db.to(b.dtype)
        if need_bias[i]:
            dbias_list[i] = dy.sum(0, dtype=torch.float32).to(bias_list[i].dtype)

    dx = None
    if need_x:
        k = x2.shape[1]
        a_all = _stacked_a(projs, a_list, dt)
        if a_all is not None:
            dx = u_all @ a_all
        else:
            dx = torch.zeros(m, k, dtype=dt, device=x2.device)
        for i in dequant_order or range(len(projs)):
            w = (dequantized or {}).get(i)
            if w is None:
                w = dequant_workspace(projs[i].packed, projs[i].state, dt)
            dx.addmm_(dys[i], w)
    return dx, da_list, db_list, dbias_list


def _rows_2d(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) != x2.shape[1]):
        x2 = x2.contiguous()
    return x2


# ----------------------------------------------------------------------------------------------
# autograd Functions
# ----------------------------------------------------------------------------------------------


class _LoRAQKVFunction(torch.autograd.Function):
    """(q, k, v) = (Pq(x), Pk(x), Pv(x)); saves x and the stacked t = x·[Aq; Ak; Av]ᵀ."""

    @staticmethod
    def forward(ctx, x2, projs, *params):
        dt = x2.dtype
        a_list, b_list, bias_list = list(params[0::3]), list(params[1::3]), list(params[2::3])
        a_all = _stacked_a(projs, a_list, dt)
        t_all = x2 @ a_all.t() if a_all is not None else None
        t_list = _split_t(t_all, projs, a_list)
        outs = [
            _project(x2, p, t, b, bias) for p, t, b, bias in zip(projs, t_list, b_list, bias_list)
        ]
        ctx.projs = projs
        ctx.save_for_backward(x2, t_all, *params)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dys):
        x2, t_all, *params = ctx.saved_tensors
        projs = ctx.projs
        a_list, b_list, bias_list = list(params[0::3]), list(params[1::3]), list(params[2::3])
        t_list = _split_t(t_all, projs, a_list)
        n = len(projs)
        needs = ctx.needs_input_grad
        need_a = [needs[2 + 3 * i] for i in range(n)]
        need_b = [needs[3 + 3 * i] for i in range(n)]
        need_bias = [needs[4 + 3 * i] for i in range(n)]
        dys = [dy.contiguous() for dy in dys]
        dx, da, db, dbias = _shared_input_backward(
            x2, dys, projs, a_list, b_list, bias_list, t_list,
            needs[0], need_a, need_b, need_bias,
        )  # fmt: skip
        grads = []
        for i in range(n):
            grads += [da[i], db[i], dbias[i]]
        return (dx, None, *grads)


class _LoRAMLPFunction(torch.autograd.Function):
    """y = Pd(silu(Pg(x)) * Pu(x)); saves x and the adapters' t (and g, u if not recompute)."""

    @staticmethod
    def forward(ctx, x2, projs, recompute, *params):
        dt = x2.dtype
        pg, pu, pd = projs
        a_list, b_list, bias_list = list(params[0::3]), list(params[1::3]), list(params[2::3])
        gu_a = _stacked_a([pg, pu], a_list[:2], dt)
        t_gu = x2 @ gu_a.t() if gu_a is not None else None
        tg, tu = _split_t(t_gu, [pg, pu], a_list[:2])
        g = _project(x2, pg, tg, b_list[0], bias_list[0])
        u = _project(x2, pu, tu, b_list[1], bias_list[1])
        # h overwrites g when g is not kept (each element is read before it is written)
        h = swiglu_forward_2d(g, u, out=g if recompute else None)
        td = h @ a_list[2].to(dt).t() if pd.has_lora else None
        y = _project(h, pd, td, b_list[2], bias_list[2])
        ctx.projs, ctx.recompute = projs, recompute
        saved_gu = (None, None) if recompute else (g, u)
        ctx.save_for_backward(x2, t_gu, td, *saved_gu, *params)
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, t_gu, td, g, u, *params = ctx.saved_tensors
        pg, pu, pd = ctx.projs
        dt = x2.dtype
        a_list, b_list, bias_list = list(params[0::3]), list(params[1::3]), list(params[2::3])
        tg, tu = _split_t(t_gu, [pg, pu], a_list[:2])
        needs = ctx.needs_input_grad  # (x2, projs, recompute, a_g, b_g, bias_g, a_u, ...)
        need_a = [needs[3 + 3 * i] for i in range(3)]
        need_b = [needs[4 + 3 * i] for i in range(3)]
        need_bias = [needs[5 + 3 * i] for i in range(3)]
        dy = dy.contiguous()

        # down projection: dh = dy·Wd + (s·dy·Bd)·Ad
        ud = (dy @ b_list[2].to(dt)).mul_(pd.scaling) if pd.has_lora else None
        wd = dequant_workspace(pd.packed, pd.state, dt)
        if ud is not None:
            dh = ud @ a_list[2].to(dt)
            dh.addmm_(dy, wd)
        else:
            dh = dy @ wd
        grads_d = [None, None, None]
        if pd.has_lora and need_b[2]:
            db = torch.empty(pd.n, td.shape[1], dtype=dt, device=dy.device)
            db.addmm_(dy.t(), td, beta=0, alpha=pd.scaling)
            grads_d[1] = db.to(b_list[2].dtype)
        if need_bias[2]:
            grads_d[2] = dy.sum(0, dtype=torch.float32).to(bias_list[2].dtype)

        # g and u: recomputed (Wu is left in the workspace for dx below) or saved; the SwiGLU
        # backward then writes dg over g, du over u and h (for dAd) over dh, element by element
        dequantized = {}
        if ctx.recompute:
            g = _project(x2, pg, tg, b_list[0], bias_list[0])
            wu = dequant_workspace(pu.packed, pu.state, dt)
            u = _project(x2, pu, tu, b_list[1], bias_list[1], w=wu)
            dequant_order, dequantized = [1, 0], {1: wu}  # dx uses Wu before Wg overwrites it
        else:
            dequant_order = [0, 1]
        need_h = pd.has_lora and need_a[2]
        swiglu_backward_2d(dh, g, u, g, u, h_out=dh if need_h else None)
        dg, du = g, u
        if not ctx.recompute:
            # the saved g, u now hold dg, du: a second backward through this graph must fail
            # loudly (saved-tensor version check) rather than read gradients as activations
            increment_version(g)
            increment_version(u)
        if need_h:
            grads_d[0] = (ud.t() @ dh).to(a_list[2].dtype)  # (s·dy·Bd)ᵀ·h
        del dh

        dx, da, db, dbias = _shared_input_backward(
            x2, [dg, du], [pg, pu], a_list[:2], b_list[:2], bias_list[:2], [tg, tu],
            needs[0], need_a[:2], need_b[:2], need_bias[:2], dequant_order, dequantized,
        )  # fmt: skip
        return (
            dx, None, None,
            da[0], db[0], dbias[0], da[1], db[1], dbias[1], *grads_d,
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# validation, references, public functions
# ----------------------------------------------------------------------------------------------


def _check_proj(module: object, name: str) -> None:
    for attr in ("packed", "quant_state", "lora_A", "lora_B", "scaling", "bias", "lora_dropout"):
        if not hasattr(module, attr):
            raise TypeError(f"{name} must be a QLoRALinear (missing attribute {attr!r})")
    if (module.lora_A is None) != (module.lora_B is None):
        raise ValueError(f"{name}: lora_A and lora_B must both be set or both be None")
    if getattr(module, "training", False) and module.lora_A is not None and module.lora_dropout:
        raise ValueError(
            f"{name}.lora_dropout={module.lora_dropout}: the fused blocks need lora_dropout == 0 "
            "in training (call the QLoRALinear modules one by one for dropout)"
        )


def _params(module) -> list:
    return [module.lora_A, module.lora_B, module.bias]


def _check_x(x: torch.Tensor, in_features: int, name: str) -> None:
    check_float(x, "x", (torch.float16, torch.bfloat16, torch.float32))
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(
            f"x.shape[-1] must equal {name}.in_features={in_features}, got x.shape={tuple(x.shape)}"
        )


def _ref_proj(z: torch.Tensor, module) -> torch.Tensor:
    return qlora_linear_ref(
        z, module.packed, module.quant_state, module.lora_A, module.lora_B,
        module.scaling, module.bias, 0.0, False,
    )  # fmt: skip


def lora_qkv_ref(x: torch.Tensor, q_proj, k_proj, v_proj) -> tuple[torch.Tensor, ...]:
    """The unfused chain in plain PyTorch: three QLoRA linears of x."""
    return tuple(_ref_proj(x, p) for p in (q_proj, k_proj, v_proj))


def lora_mlp_ref(x: torch.Tensor, gate_proj, up_proj, down_proj) -> torch.Tensor:
    """The unfused chain in plain PyTorch: down(silu(gate(x)) * up(x))."""
    return _ref_proj(swiglu_ref(_ref_proj(x, gate_proj), _ref_proj(x, up_proj)), down_proj)


def lora_qkv(x: torch.Tensor, q_proj, k_proj, v_proj) -> tuple[torch.Tensor, ...]:
    """(q_proj(x), k_proj(x), v_proj(x)) for QLoRALinear projections sharing x, as one fused
    autograd op that saves only x (plus the adapters' r-wide t). Any leading shape of x."""
    names = ("q_proj", "k_proj", "v_proj")
    mods = (q_proj, k_proj, v_proj)
    for mod, name in zip(mods, names):
        _check_proj(mod, name)
    k_in = int(q_proj.quant_state.shape[1])
    _check_x(x, k_in, "q_proj")
    for mod, name in zip(mods[1:], names[1:]):
        if int(mod.quant_state.shape[1]) != k_in:
            raise ValueError(
                f"{name}.in_features={int(mod.quant_state.shape[1])} != q_proj.in_features={k_in}"
            )
    params = [t for mod in mods for t in _params(mod)]
    check_same_device(x=x, **{n: m.packed for n, m in zip(names, mods)})
    lead = x.shape[:-1]
    if not _use_triton(x, *params, *(m.packed for m in mods)):
        return lora_qkv_ref(x, *mods)
    x2 = _rows_2d(x)
    if x2.shape[0] <= NF4_MATMUL_MAX_M:
        return tuple(m(x) for m in mods)
    outs = _LoRAQKVFunction.apply(x2, [_Proj(m) for m in mods], *params)
    return tuple(o.view(*lead, o.shape[-1]) for o in outs)


def lora_mlp(
    x: torch.Tensor, gate_proj, up_proj, down_proj, recompute: bool = True
) -> torch.Tensor:
    """down_proj(silu(gate_proj(x)) * up_proj(x)) for QLoRALinear projections, as one fused
    autograd op. ``recompute=True`` (default) saves only x (plus r-wide tensors) and recomputes
    gate/up in backward; ``recompute=False`` also saves gate and up (no extra GEMMs)."""
    names = ("gate_proj", "up_proj", "down_proj")
    mods = (gate_proj, up_proj, down_proj)
    for mod, name in zip(mods, names):
        _check_proj(mod, name)
    hidden = int(gate_proj.quant_state.shape[1])
    inter = int(gate_proj.quant_state.shape[0])
    _check_x(x, hidden, "gate_proj")
    if tuple(int(d) for d in up_proj.quant_state.shape) != (inter, hidden):
        raise ValueError(
            f"up_proj weight {tuple(up_proj.quant_state.shape)} must match gate_proj's "
            f"({inter}, {hidden})"
        )
    if int(down_proj.quant_state.shape[1]) != inter:
        raise ValueError(
            f"down_proj.in_features={int(down_proj.quant_state.shape[1])} must equal "
            f"gate_proj.out_features={inter}"
        )
    params = [t for mod in mods for t in _params(mod)]
    check_same_device(x=x, **{n: m.packed for n, m in zip(names, mods)})
    if not _use_triton(x, *params, *(m.packed for m in mods)):
        return lora_mlp_ref(x, *mods)
    x2 = _rows_2d(x)
    if x2.shape[0] <= NF4_MATMUL_MAX_M:
        return down_proj(swiglu(gate_proj(x), up_proj(x)))
    y = _LoRAMLPFunction.apply(x2, [_Proj(m) for m in mods], bool(recompute), *params)
    return y.view(*x.shape[:-1], y.shape[-1])
