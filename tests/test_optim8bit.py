"""AdamW8bit: dynamic maps, blockwise 8-bit quantization, kernel == reference, the multi-tensor
step == per-tensor updates (flat state layout, launches per step), convergence against float32
AdamW, non-finite gradients, 32-bit small tensors, state_dict, bad arguments."""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qkern
from qkern.optim8bit import (
    AdamW8bit,
    adamw8bit_step,
    adamw8bit_step_ref,
    dequantize_blockwise_ref,
    dynamic_map,
    quantize_blockwise_ref,
)
from tests.helpers import kernel_device

# ----------------------------------------------------------------------------------------------
# maps and quantization
# ----------------------------------------------------------------------------------------------


def test_signed_dynamic_map_structure():
    q = dynamic_map(signed=True).double()
    assert q.shape == (256,) and q.dtype == torch.float64
    assert torch.all(q[1:] > q[:-1]), "sorted, no duplicates"
    assert q[127] == 0.0 and q[255] == 1.0
    assert q[0] == torch.tensor(-0.99296875, dtype=torch.float32).double()
    # 2^i positive values in decade i = 0..6 (10^(i-7), 10^(i-6)], mirrored for negatives
    for i in range(7):
        lo, hi = 10.0 ** (i - 7), 10.0 ** (i - 6)
        assert int(((q > lo) & (q < hi)).sum()) == 2**i
        assert int(((q < -lo) & (q > -hi)).sum()) == 2**i


def test_unsigned_dynamic_map_structure():
    u = dynamic_map(signed=False).double()
    assert torch.all(u[1:] > u[:-1])
    assert u[0] == 0.0 and u[255] == 1.0 and bool((u >= 0).all())
    for i in range(7):
        lo, hi = 10.0 ** (i - 7), 10.0 ** (i - 6)
        assert int(((u > lo) & (u < hi)).sum()) == 2 ** (i + 1)


def test_signed_map_matches_double_quant_map():
    nf4 = pytest.importorskip("qkern.nf4")
    assert torch.equal(dynamic_map(signed=True), nf4.dynamic_map())


@settings(max_examples=15)
@given(
    n=st.integers(1, 1500),
    blocksize=st.sampled_from([64, 256, 1024]),
    log_scale=st.floats(-20, 20),
    signed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_quantize_is_nearest_entry_within_rounding(n, blocksize, log_scale, signed, seed):
    """Each decoded value is as close to x as the nearest map entry, up to the float32 rounding
    of the thresholds, and a block's largest magnitude is represented to the map's precision."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * math.exp(log_scale)
    if not signed:
        x = x * x
    x[torch.rand(n, generator=g) < 0.05] = 0.0
    codes, absmax = quantize_blockwise_ref(x, blocksize, signed)
    assert codes.dtype == torch.uint8 and codes.shape == (n,)
    assert absmax.dtype == torch.float32 and absmax.shape == (math.ceil(n / blocksize),)
    out = dequantize_blockwise_ref(codes, absmax, blocksize, signed).double()
    scale = absmax.double().repeat_interleave(blocksize)[:n]
    q = dynamic_map(signed).double()
    xs = x.double() / scale.clamp_min(1e-300)
    best = (xs[:, None] - q[None, :]).abs().min(dim=1).values * scale
    err = (out - x.double()).abs()
    assert bool((err <= best + 1e-6 * scale + 1e-45).all())
    # the largest element of each block: exactly 1.0 * absmax if positive, -0.99296875 if negative
    xb = torch.zeros(len(absmax) * blocksize)
    xb[:n] = x
    top = xb.view(-1, blocksize).abs().argmax(dim=1)
    idx = torch.arange(len(absmax)) * blocksize + top
    idx = idx[idx < n]
    top_codes = codes[idx].long()
    assert bool(((top_codes == 255) | ((top_codes == 0) & (x[idx] < 0)) | (x[idx] == 0)).all())


def test_zero_block_decodes_to_zero():
    x = torch.zeros(300)
    x[256:] = torch.randn(44)
    codes, absmax = quantize_blockwise_ref(x, 256, True)
    assert absmax[0] == 0
    assert bool((dequantize_blockwise_ref(codes, absmax, 256, True)[:256] == 0).all())


def test_error_in_top_decade():
    """In [0.1, 1] * absmax the signed map has 64 evenly spaced values (midpoints of a 65-point
    linspace), so the error there is at most half a step: 0.9 / 64 / 2 * absmax."""
    x = torch.linspace(0.1, 1.0, 1000)
    codes, absmax = quantize_blockwise_ref(x, 1024, True)
    out = dequantize_blockwise_ref(codes, absmax, 1024, True)
    assert float((out - x).abs().max()) <= 0.9 / 64 / 2 * 1.0001


# ----------------------------------------------------------------------------------------------
# kernel vs reference
# ----------------------------------------------------------------------------------------------


def _twin(shape, dtype, device, seed=0, transposed=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g).to(dtype)
    if transposed:  # a non-contiguous parameter
        w = w.t().contiguous().t()
    a = torch.nn.Parameter(w.clone().to(device) if not transposed else w.to(device))
    b = torch.nn.Parameter(w.clone().to("cpu"))
    return a, b


@pytest.mark.parametrize(
    "shape,dtype,blocksize,min_8bit,transposed",
    [
        ((4097,), torch.float32, 256, 4096, False),  # 8-bit, short last block
        ((33, 40), torch.float16, 64, 1000, True),  # 8-bit fp16, non-contiguous, blocksize 64
        ((37, 3), torch.float32, 256, 4096, False),  # 32-bit states
    ],
)
def test_kernel_matches_reference(shape, dtype, blocksize, min_8bit, transposed):
    dev = kernel_device()
    a, b = _twin(shape, dtype, dev, transposed=transposed)
    assert a.is_contiguous() != transposed
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05, blocksize=blocksize)
    oa = AdamW8bit([a], min_8bit_size=min_8bit, **kw)
    ob = AdamW8bit([b], min_8bit_size=min_8bit, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        grad = (torch.randn(shape, generator=g) * 3).to(dtype)
        a.grad, b.grad = grad.to(dev), grad.clone()
        with qkern.backend("triton"):
            oa.step()
        with qkern.backend("reference"):
            ob.step()
        sa, sb = oa.state[a], ob.state[b]
        assert sorted(sa) == sorted(sb)
        for key in sa:
            x, y = sa[key].cpu(), sb[key]
            assert x.dtype == y.dtype, key
            if x.dtype == torch.uint8:
                # bit-exact under the interpreter; the GPU may move a value across a threshold
                diff = (x.int() - y.int()).abs()
                limit = 0 if dev == "cpu" else 1
                assert int(diff.max()) <= limit, key
            else:
                torch.testing.assert_close(x, y, rtol=0 if dev == "cpu" else 1e-6, atol=0)
        # IEEE div/sqrt and no FMA in the kernel: equal to the reference (exp2 may differ by an
        # ulp on a GPU, moving the parameter by ~1e-7 of the update)
        torch.testing.assert_close(a.detach().cpu(), b.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("mode", ["triton", "reference"])
def test_nonfinite_gradient_skips_whole_step(bad, mode):
    dev = kernel_device() if mode == "triton" else "cpu"
    torch.manual_seed(0)
    big = torch.nn.Parameter(torch.randn(1100, device=dev))
    small = torch.nn.Parameter(torch.randn(50, device=dev))
    opt = AdamW8bit([big, small], lr=0.1, weight_decay=0.1, min_8bit_size=1000)
    with qkern.backend(mode):
        big.grad, small.grad = torch.randn_like(big), torch.randn_like(small)
        opt.step()  # step 1: states become non-zero
        before = {id(p): (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
                  for p in (big, small)}  # fmt: skip
        big.grad = torch.randn_like(big)
        small.grad = torch.randn_like(small)
        small.grad[7] = bad  # one element of the *other* tensor
        opt.step()
        for p in (big, small):
            p0, s0 = before[id(p)]
            assert torch.equal(p.detach(), p0), "parameter changed on a skipped step"
            for k, v in opt.state[p].items():
                assert torch.equal(v, s0[k]), f"state {k} changed on a skipped step"
            assert float(opt.state[p]["step"]) == 1.0
        small.grad = torch.randn_like(small)
        opt.step()
        assert float(opt.state[big]["step"]) == 2.0
        assert not torch.equal(big.detach(), before[id(big)][0])
        assert bool(torch.isfinite(big).all()) and bool(torch.isfinite(small).all())


def test_overflowing_square_counts_as_nonfinite():
    p = torch.nn.Parameter(torch.zeros(10))
    opt = AdamW8bit([p])
    p.grad = torch.full((10,), 3e19)  # finite, but g*g overflows float32
    opt.step()
    assert float(opt.state[p]["step"]) == 0.0 and bool((p == 0).all())


# ----------------------------------------------------------------------------------------------
# against float32 AdamW
# ----------------------------------------------------------------------------------------------


def test_small_tensor_states_are_fp32_and_track_torch_adamw():
    torch.manual_seed(0)
    w = torch.randn(40, 30)
    a, b = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    ours = AdamW8bit([a], lr=1e-2, weight_decay=0.1, min_8bit_size=4096)
    ref = torch.optim.AdamW([b], lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        g = torch.randn(40, 30)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    st_ = ours.state[a]
    assert st_["exp_avg"].dtype == torch.float32 and "exp_avg_q" not in st_
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st_["exp_avg"].view(40, 30), ref.state[b]["exp_avg"])


def test_first_step_equals_fp32_adamw_and_weight_decay_is_decoupled():
    """Step 1 uses the unquantized new moments, so it is AdamW's step 1; with zero gradients
    (zero moments) the only change is the decoupled decay p * (1 - lr * wd)."""
    torch.manual_seed(0)
    w = torch.randn(8192)
    a, b = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    ours = AdamW8bit([a], lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW([b], lr=1e-2, weight_decay=0.1)
    g = torch.randn(8192)
    a.grad, b.grad = g.clone(), g.clone()
    ours.step()
    ref.step()
    assert "exp_avg_q" in ours.state[a]
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-6)
    c = torch.nn.Parameter(w.clone())
    opt = AdamW8bit([c], lr=1e-2, weight_decay=0.1)
    c.grad = torch.zeros_like(c)
    opt.step()
    decay = torch.tensor(1 - 1e-2 * 0.1, dtype=torch.float32)
    assert torch.equal(c.detach(), w * decay)


def _train(opt_name: str, seed: int, steps: int = 120, device: str = "cpu") -> list[float]:
    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(16, 32, generator=g) / 4, torch.randn(32, 4, generator=g) / 4
    x = torch.randn(512, 16, generator=g)
    y = torch.tanh(x @ w1) @ w2 + 0.1 * torch.randn(512, 4, generator=g)
    x, y = x.to(device), y.to(device)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
        torch.nn.Linear(64, 4),
    ).to(device)  # fmt: skip
    if opt_name == "fp32":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    else:  # the three weight matrices (1024, 4096, 256 elements) -> two 8-bit, biases 32-bit
        opt = AdamW8bit(model.parameters(), lr=1e-2, weight_decay=0.01, min_8bit_size=1024)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps))
    )
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    if opt_name != "fp32":
        n8 = sum("exp_avg_q" in s for s in opt.state.values())
        assert n8 == 2, "expected two parameters with 8-bit states"
    return losses


@pytest.fixture
def one_thread():
    # hundreds of tiny CPU ops: thread hand-offs cost more than they bring on a busy machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("seed", [0, 1])
def test_convergence_matches_fp32_adamw(seed, one_thread):
    """A small MLP regression to a noisy teacher (noise floor 0.01), cosine schedule: the 8-bit
    run's loss stays within a few % of float32 AdamW's along the way and at the end."""
    ref = _train("fp32", seed)
    ours = _train("8bit", seed)
    assert ref[-1] < 0.1 * ref[0], "the problem should actually be learned"
    for i in (30, 60, len(ref) - 1):
        assert abs(ours[i] / ref[i] - 1) < 0.05, (i, ours[i], ref[i])


# ----------------------------------------------------------------------------------------------
# multi-tensor step: every tensor of a bucket in one launch, states in flat buffers
# ----------------------------------------------------------------------------------------------

# (shape, dtype, group, transposed parameter, transposed gradient)
_MIXED = [
    ((4097,), torch.float32, 0, False, False),  # 8-bit, short last block
    ((1,), torch.float32, 0, False, False),  # 32-bit, one element
    ((64, 65), torch.float32, 0, True, False),  # 8-bit, non-contiguous parameter
    ((37, 3), torch.float32, 0, False, True),  # 32-bit, non-contiguous gradient
    ((5000,), torch.float16, 0, False, False),  # 8-bit float16: a bucket of its own
    ((2049,), torch.float32, 1, False, False),  # group 1 (blocksize 64): 8-bit
    ((999,), torch.float32, 1, False, False),  # group 1: 32-bit
    ((17, 64), torch.float16, 1, False, True),  # group 1: 8-bit float16, transposed gradient
]
_GROUPS = [
    dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05, blocksize=256,
         min_8bit_size=4096),
    dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.0, blocksize=64,
         min_8bit_size=1000),
]  # fmt: skip


def _mixed_params(device, seed=0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape, dtype, _, transposed, _ in _MIXED:
        w = torch.randn(shape, generator=g).to(dtype).to(device)
        out.append(torch.nn.Parameter(w.t().contiguous().t() if transposed else w))
    return out


def _mixed_optimizer(params) -> AdamW8bit:
    groups = [
        {"params": [p for p, spec in zip(params, _MIXED) if spec[2] == k], **_GROUPS[k]}
        for k in (0, 1)
    ]
    return AdamW8bit(groups)


def _mixed_grads(gen, skip=()) -> list[torch.Tensor | None]:
    grads = []
    for i, (shape, dtype, _, _, transposed) in enumerate(_MIXED):
        grad = (torch.randn(shape, generator=gen) * 3).to(dtype)
        grads.append(None if i in skip else grad.t().contiguous().t() if transposed else grad)
    return grads


def _fresh_state(p: torch.Tensor, group: dict) -> dict:
    n, bs = p.numel(), group["blocksize"]
    st_ = {"step": torch.zeros((), device=p.device)}
    if n < group["min_8bit_size"]:
        st_.update(
            exp_avg=torch.zeros(n, device=p.device), exp_avg_sq=torch.zeros(n, device=p.device)
        )
    else:
        nb = math.ceil(n / bs)
        st_.update(
            exp_avg_q=torch.full((n,), 127, dtype=torch.uint8, device=p.device),
            exp_avg_absmax=torch.zeros(nb, device=p.device),
            exp_avg_sq_q=torch.zeros(n, dtype=torch.uint8, device=p.device),
            exp_avg_sq_absmax=torch.zeros(nb, device=p.device),
        )
    return st_


@pytest.mark.parametrize("oracle", ["reference", "one-tensor kernel"])
def test_multi_tensor_step_equals_per_tensor_updates(oracle):
    """The optimizer (all tensors of a bucket per launch) against per-tensor updates with their
    own states, over steps where the set of tensors and the layout change: a tensor without a
    gradient at first (its states are created at step 2, the flat buffers re-packed), two
    tensors without a gradient at step 2 (their counters lag), a parameter given new storage at
    step 3, a gradient gone at step 4. Mixed groups (lr, betas, eps, weight decay, blocksize),
    dtypes, 8/32-bit states, odd sizes, non-contiguous parameters and gradients. Codes, absmax,
    moments, counters and parameters are compared bit for bit (against the reference on a GPU:
    codes within 1 and parameters within 1e-6, as for one tensor)."""
    dev = kernel_device()
    ours = _mixed_params(dev)
    opt = _mixed_optimizer(ours)
    twin_dev = "cpu" if oracle == "reference" else dev
    twins = [p.detach().clone().to(twin_dev) for p in ours]
    twins[2] = twins[2].t().contiguous().t()
    states: list[dict | None] = [None] * len(ours)
    exact = dev == "cpu" or oracle != "reference"
    gen = torch.Generator().manual_seed(1)
    for step, skip in enumerate([(6,), (1, 5), (), (2,)]):
        if step == 2:
            ours[0].data = ours[0].data.clone()
        grads = _mixed_grads(gen, skip)
        for p, g in zip(ours, grads):
            p.grad = None if g is None else g.to(dev)
        with qkern.backend("triton"):
            opt.step()
        for i, (twin, g) in enumerate(zip(twins, grads)):
            if g is None:
                continue
            group = _GROUPS[_MIXED[i][2]]
            if states[i] is None:
                states[i] = _fresh_state(twin, group)
            states[i]["step"] += 1
            kw = {k: group[k] for k in ("lr", "betas", "eps", "weight_decay", "blocksize")}
            if oracle == "reference":
                adamw8bit_step_ref(twin, g, states[i], **kw)
            else:
                with qkern.backend("triton"):
                    adamw8bit_step(twin, g.to(dev), states[i], skip=torch.zeros((), device=dev),
                                   **kw)  # fmt: skip
        for i, (p, twin) in enumerate(zip(ours, twins)):
            if states[i] is None:
                assert len(opt.state.get(p, {})) == 0, "state created without a gradient"
                continue
            ours_st = opt.state[p]
            assert sorted(ours_st) == sorted(states[i]), i
            for key, ref in states[i].items():
                x = ours_st[key].cpu()
                assert x.dtype == ref.dtype and x.shape == ref.shape, (i, key)
                if exact:
                    assert torch.equal(x, ref.cpu()), (step, i, key)
                elif x.dtype == torch.uint8:
                    assert int((x.int() - ref.cpu().int()).abs().max()) <= 1, (i, key)
                else:
                    torch.testing.assert_close(x, ref.cpu(), rtol=1e-6, atol=0)
            if exact:
                assert torch.equal(p.detach().cpu(), twin.cpu()), (step, i)
            else:
                torch.testing.assert_close(p.detach().cpu(), twin.cpu(), rtol=1e-6, atol=1e-7)
    # the layout: tensors of one bucket share one flat buffer, segments start on block bounds
    a, b = opt.state[ours[0]]["exp_avg_q"], opt.state[ours[2]]["exp_avg_q"]
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    assert {a.storage_offset() % 256, b.storage_offset() % 256} == {0}
    assert ours[2].stride() == (1, 64), "a non-contiguous parameter keeps its layout"


def test_step_without_gradients_changes_nothing():
    dev = kernel_device()
    params = _mixed_params(dev)
    opt = _mixed_optimizer(params)
    gen = torch.Generator().manual_seed(4)
    for p, g in zip(params, _mixed_grads(gen)):
        p.grad = g.to(dev)
    with qkern.backend("triton"):
        opt.step()
        before = [p.detach().clone() for p in params]
        opt.zero_grad()
        opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert all(float(opt.state[p]["step"]) == 1.0 for p in params)


def test_launches_do_not_grow_with_the_tensor_count(monkeypatch):
    """A step is one gradient-check launch per gradient dtype plus one update launch per
    (group, dtype, 8/32-bit) bucket, however many tensors there are."""
    from qkern import optim8bit

    launches = []
    real = optim8bit._direct_launch

    def counting(kernel, *args, **kw):
        launches.append(kernel)
        return real(kernel, *args, **kw)

    monkeypatch.setattr(optim8bit, "_direct_launch", counting)
    dev = kernel_device()
    for count in (2, 12):
        params = [torch.nn.Parameter(torch.randn(4, 256 + i, device=dev)) for i in range(count)]
        small = [torch.nn.Parameter(torch.randn(7 + i, device=dev)) for i in range(count)]
        opt = AdamW8bit(params + small, min_8bit_size=1000)
        launches.clear()
        for _ in range(2):
            for p in params + small:
                p.grad = torch.randn_like(p)
            with qkern.backend("triton"):
                opt.step()
        assert len(launches) == 2 * 3, (count, launches)
        assert launches.count(optim8bit._grad_check_kernel) == 2
        assert all(float(opt.state[p]["step"]) == 2.0 for p in params + small)


def test_nonfinite_gradient_in_one_tensor_skips_every_group():
    """One non-finite element in one tensor skips the step for every tensor of every group on
    the device (float32 and float16 gradients: two check launches sharing one decision); the
    next finite step goes through (the sums and the ticket counter were reset)."""
    dev = kernel_device()
    params = _mixed_params(dev)
    opt = _mixed_optimizer(params)
    gen = torch.Generator().manual_seed(2)

    def step(poison: int | None = None, bad: float = 0.0) -> None:
        for i, (p, g) in enumerate(zip(params, _mixed_grads(gen))):
            if i == poison:
                g[tuple(s // 2 for s in g.shape)] = bad
            p.grad = g.to(dev)
        with qkern.backend("triton"):
            opt.step()

    def snapshot() -> list:
        return [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
                for p in params]  # fmt: skip

    step()
    # a NaN in the float16 tensor of group 1, then an inf in a float32 tensor of group 0
    for poison, bad, count in ((7, float("nan"), 1), (0, float("inf"), 2)):
        before = snapshot()
        step(poison, bad)
        for p, (p0, s0) in zip(params, before):
            assert torch.equal(p.detach(), p0), "parameter changed on a skipped step"
            for k, v in opt.state[p].items():
                assert torch.equal(v, s0[k]), f"state {k} changed on a skipped step"
            assert float(opt.state[p]["step"]) == count
        step()
        for p, (p0, _) in zip(params, before):
            assert float(opt.state[p]["step"]) == count + 1
            assert not torch.equal(p.detach(), p0)
            assert bool(torch.isfinite(p).all())


def test_state_dict_round_trip_through_the_flat_layout():
    """Save after kernel steps (the states are views into flat buffers: the saved tensors have
    the per-parameter shapes), load into a fresh optimizer (standalone tensors, re-packed at its
    first step), continue both: bit-identical parameters and states."""
    dev = kernel_device()
    params_a = _mixed_params(dev)
    opt_a = _mixed_optimizer(params_a)
    gen = torch.Generator().manual_seed(3)
    grads = [_mixed_grads(gen) for _ in range(4)]

    def step(opt, params, gs):
        for p, g in zip(params, gs):
            p.grad = g.to(dev)
        with qkern.backend("triton"):
            opt.step()

    for gs in grads[:2]:
        step(opt_a, params_a, gs)
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    for i, p in enumerate(params_a):
        saved = loaded["state"][i]
        bs = _GROUPS[_MIXED[i][2]]["blocksize"]
        if "exp_avg_q" in saved:
            assert saved["exp_avg_q"].shape == (p.numel(),)
            assert saved["exp_avg_sq_absmax"].shape == (math.ceil(p.numel() / bs),)
        else:
            assert saved["exp_avg"].shape == (p.numel(),)
        assert saved["step"].shape == () and float(saved["step"]) == 2.0
    params_b = [torch.nn.Parameter(p.detach().clone()) for p in params_a]
    opt_b = _mixed_optimizer(params_b)
    opt_b.load_state_dict(loaded)
    for gs in grads[2:]:
        step(opt_a, params_a, gs)
        step(opt_b, params_b, gs)
    for pa, pb in zip(params_a, params_b):
        assert torch.equal(pa, pb)
        assert sorted(opt_a.state[pa]) == sorted(opt_b.state[pb])
        for k in opt_a.state[pa]:
            assert torch.equal(opt_a.state[pa][k], opt_b.state[pb][k]), k
    # re-packed: the loaded states now live in one flat buffer per bucket again
    a, b = opt_b.state[params_b[0]]["exp_avg_q"], opt_b.state[params_b[2]]["exp_avg_q"]
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    steps = [opt_b.state[p]["step"] for p in params_b]
    assert len({s.untyped_storage().data_ptr() for s in steps}) == 1


# ----------------------------------------------------------------------------------------------
# state_dict, groups, arguments
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip(dtype):
    torch.manual_seed(0)
    w_big, w_small = torch.randn(64, 80).to(dtype), torch.randn(20).to(dtype)
    params_a = [torch.nn.Parameter(w_big.clone()), torch.nn.Parameter(w_small.clone())]
    opt_a = AdamW8bit(params_a, lr=1e-2, weight_decay=0.01, min_8bit_size=4096)
    grads = [[torch.randn_like(p) for p in params_a] for _ in range(4)]
    for gs in grads[:2]:
        for p, g in zip(params_a, gs):
            p.grad = g.clone()
        opt_a.step()
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    buf.seek(0)
    params_b = [torch.nn.Parameter(p.detach().clone()) for p in params_a]
    opt_b = AdamW8bit(params_b, lr=1e-2, weight_decay=0.01, min_8bit_size=4096)
    opt_b.load_state_dict(torch.load(buf, weights_only=True))
    sb = opt_b.state[params_b[0]]
    assert sb["exp_avg_q"].dtype == torch.uint8 and sb["exp_avg_absmax"].dtype == torch.float32
    assert opt_b.state[params_b[1]]["exp_avg"].dtype == torch.float32
    assert float(sb["step"]) == 2.0
    for gs in grads[2:]:
        for pa, pb, g in zip(params_a, params_b, gs):
            pa.grad, pb.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    for pa, pb in zip(params_a, params_b):
        assert torch.equal(pa, pb)
        for k in opt_a.state[pa]:
            assert torch.equal(opt_a.state[pa][k], opt_b.state[pb][k]), k


def test_load_state_dict_rejects_mismatched_blocksize():
    p = torch.nn.Parameter(torch.randn(5000))
    opt = AdamW8bit([p], blocksize=256)
    p.grad = torch.randn_like(p)
    opt.step()
    other = AdamW8bit([torch.nn.Parameter(torch.randn(5000))], blocksize=128)
    sd = opt.state_dict()
    sd["param_groups"][0]["blocksize"] = 128
    with pytest.raises(ValueError, match="blocksize"):
        other.load_state_dict(sd)


def test_param_groups_use_their_own_lr():
    w = torch.randn(3000)
    a, b = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    opt = AdamW8bit([{"params": [a], "lr": 1e-2}, {"params": [b], "lr": 1e-3}])
    g = torch.randn(3000)
    a.grad, b.grad = g.clone(), g.clone()
    opt.step()
    da, db = (a.detach() - w).abs().mean(), (b.detach() - w).abs().mean()
    assert abs(float(da / db) - 10) < 0.01


def test_reference_function_direct_call_matches_optimizer():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5000))
    q = p.detach().clone()
    opt = AdamW8bit([p], lr=1e-3)
    g = torch.randn(5000)
    p.grad = g
    opt.step()
    state = {k: torch.zeros_like(v) for k, v in opt.state[p].items()}
    state["exp_avg_q"].fill_(127)
    state["step"].fill_(1)
    adamw8bit_step_ref(
        q, g, state, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, blocksize=256
    )
    assert torch.equal(q, p.detach())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=-1.0), "lr"),
        (dict(betas=(1.0, 0.9)), "betas"),
        (dict(betas=(0.9,)), "betas"),
        (dict(eps=-1e-8), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(blocksize=100), "blocksize"),
        (dict(blocksize=8192), "blocksize"),
        (dict(min_8bit_size=-1), "min_8bit_size"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdamW8bit([torch.nn.Parameter(torch.randn(4))], **kwargs)


def test_bad_param_group_and_param_dtype():
    opt = AdamW8bit([torch.nn.Parameter(torch.randn(4))])
    with pytest.raises(ValueError, match="blocksize"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(4))], "blocksize": 3})
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        AdamW8bit([torch.zeros(4, dtype=torch.float64, requires_grad=True)])


def test_sparse_gradient_is_rejected():
    p = torch.nn.Parameter(torch.randn(10, 3))
    opt = AdamW8bit([p])
    p.grad = torch.sparse_coo_tensor(torch.tensor([[0]]), torch.ones(1, 3), (10, 3))
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


# ----------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_kernel_matches_reference_lora_shapes(dtype):
    """LoRA-like tensors on the GPU against the CPU reference: codes within 1, params within an
    ulp of the parameter dtype."""
    shapes = [(16, 4096), (14336, 16), (16, 1000), (8, 8)]
    ours = [torch.nn.Parameter(torch.randn(s).to(dtype).cuda()) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().cpu().clone()) for p in ours]
    oa, ob = AdamW8bit(ours, lr=1e-3, weight_decay=0.01), AdamW8bit(ref, lr=1e-3, weight_decay=0.01)
    for _ in range(3):
        for pa, pb in zip(ours, ref):
            g = torch.randn(pa.shape).to(dtype)
            pa.grad, pb.grad = g.cuda(), g
        oa.step()
        ob.step()
    for pa, pb in zip(ours, ref):
        for k, v in oa.state[pa].items():
            if v.dtype == torch.uint8:
                assert int((v.cpu().int() - ob.state[pb][k].int()).abs().max()) <= 1
        ulp = torch.finfo(dtype).eps
        torch.testing.assert_close(pa.detach().cpu().float(), pb.detach().float(), rtol=ulp,
                                   atol=1e-6)  # fmt: skip


@pytest.mark.gpu
def test_gpu_convergence_matches_fp32_adamw():
    """The same regression as the CPU test, through the Triton kernel."""
    ref = _train("fp32", 0, device="cuda")
    ours = _train("8bit", 0, device="cuda")
    for i in (30, 60, len(ref) - 1):
        assert abs(ours[i] / ref[i] - 1) < 0.05, (i, ours[i], ref[i])


@pytest.mark.parametrize("change", ["dtype", "size"])
def test_parameter_replaced_by_another_dtype_or_size(change):
    """p.data replaced between steps by a tensor of another dtype or size: the step must follow
    the new tensor (as the reference path does), never run the old layout over it."""
    dev = kernel_device()
    results = []
    for mode in ("triton", "reference"):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(8192, device=dev))
        opt = AdamW8bit([p], lr=1e-2, min_8bit_size=16)
        with qkern.backend(mode):
            p.grad = torch.randn(8192, device=dev)
            opt.step()
            if change == "dtype":
                p.data = p.data.half()
                p.grad = torch.randn(8192, device=dev).half()
            else:
                p.data = p.data[:4096].clone()
                p.grad = torch.randn(4096, device=dev)
                opt.state.pop(p)  # its moments no longer fit: start them again
            before = p.detach().clone()
            opt.step()
        assert (p.detach() != before).any(), mode
        results.append(p.detach().float().cpu())
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=2e-3)
