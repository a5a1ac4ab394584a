"""qkern.nf4: format tables, reference rules, Triton == reference bit for bit, round-trip bounds,
bitsandbytes serialization, caller buffers and input errors.

The Triton kernels run through the interpreter on CPU (fp32/fp16, small shapes) and natively on
CUDA. Quantization is compared with the IEEE-reciprocal mode on both, which is what the reference
computes; the GPU default (the hardware reciprocal bitsandbytes uses) is checked against
bitsandbytes itself in test_nf4_bnb.py.
"""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
from helpers import kernel_device, poisoned
from hypothesis import given
from hypothesis import strategies as st

import qkern
from qkern import nf4

DEV = kernel_device()

# The interpreter evaluates 1/0 for all-zero blocks in numpy, which warns; the result (inf, then
# NaN -> index 0) is what bitsandbytes does.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

FORMATS_NF4 = [
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
]


def _weight(shape, dtype, seed, scale=1.0, zero_block=None, blocksize=64):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * scale
    flat = w.view(-1)
    flat[torch.randint(0, flat.numel(), (max(1, flat.numel() // 300),), generator=g)] *= 8.0
    if zero_block is not None:
        nb = -(-flat.numel() // blocksize)
        b = zero_block % nb
        flat[b * blocksize : (b + 1) * blocksize] = 0.0
    return w.to(dtype)


def _triton_quantize(w, bs, qt, dq):
    with qkern.backend("triton"):
        return nf4._quantize_4bit_triton(w, bs, qt, dq, rcp_mode=nf4.RCP_IEEE)


def _triton_dequantize(packed, state, out=None, dtype=None):
    with qkern.backend("triton"):
        return nf4.dequantize_4bit(packed, state, out=out, dtype=dtype)


def _assert_same_state(a: nf4.QuantState, b: nf4.QuantState) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype and a.blocksize == b.blocksize
    assert a.quant_type == b.quant_type and a.double_quant == b.double_quant
    assert torch.equal(a.absmax.cpu(), b.absmax.cpu()), "absmax (codes) differ"
    assert torch.equal(a.code.cpu(), b.code.cpu())
    if a.double_quant:
        assert torch.equal(a.nested_absmax.cpu(), b.nested_absmax.cpu()), "nested absmax differ"
        assert torch.equal(a.nested_code.cpu(), b.nested_code.cpu())
        assert a.offset == b.offset


# ---- tables ----------------------------------------------------------------------------------


def test_nf4_code_table_is_the_documented_one():
    assert nf4.code_table("nf4").tolist() == FORMATS_NF4
    assert nf4.code_table("nf4").dtype == torch.float32


def test_thresholds_are_midpoints_of_adjacent_codes():
    """Each NF4 threshold is within one float32 ulp of the exact midpoint of its neighbours."""
    code = torch.tensor(FORMATS_NF4, dtype=torch.float64)
    mids = ((code[:-1] + code[1:]) / 2).tolist()
    for t, m in zip(nf4.NF4_THRESHOLDS, mids):
        assert abs(t - m) <= math.ulp(m) * 2**29  # one float32 ulp (normal numbers)
        assert torch.tensor(t, dtype=torch.float32).item() == t  # exact float32
    fp4_sorted = sorted(nf4.FP4_MAGNITUDES)
    for t, lo, hi in zip(nf4.FP4_THRESHOLDS, fp4_sorted[:-1], fp4_sorted[1:]):
        assert lo < t < hi and abs(t - (lo + hi) / 2) < 1e-6


def test_fp4_table_is_bnb_e2m1_over_12():
    mags = [0, 0.0625, 8, 12, 4, 6, 2, 3]
    got = nf4.code_table("fp4")
    want = torch.tensor(mags + [-m for m in mags], dtype=torch.float32) / 12
    assert torch.equal(got, want)
    # every FP4 rank maps to the magnitude that sorts at that rank
    order = sorted(range(8), key=lambda i: nf4.FP4_MAGNITUDES[i])
    assert list(nf4.FP4_RANK_TO_INDEX) == order


def test_dynamic_map_shape_and_landmarks():
    m = nf4.dynamic_map()
    assert m.dtype == torch.float32 and m.numel() == 256
    assert m[127].item() == 0.0 and m[255].item() == 1.0
    assert m[0].item() == pytest.approx(-0.99296875, abs=1e-7)
    assert bool((m[1:] > m[:-1]).all()), "strictly increasing"
    # negative half is the exact negation of the positive half (without 1.0)
    assert torch.equal(-m[:127].flip(0), m[128:255])


# ---- reference rules -------------------------------------------------------------------------


@given(seed=st.integers(0, 2**31 - 1), qt=st.sampled_from(nf4.QUANT_TYPES))
def test_encode_is_count_of_thresholds_strictly_below(seed, qt):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(500, generator=g) * 2 - 1
    thr = torch.tensor(nf4.NF4_THRESHOLDS if qt == "nf4" else nf4.FP4_THRESHOLDS)
    # put some values exactly on thresholds: they must take the lower code
    x[:20] = thr[torch.randint(0, thr.numel(), (20,), generator=g)] * (1 if qt == "nf4" else -1)
    got = nf4.encode_4bit_ref(x, qt)
    if qt == "nf4":
        want = (x[:, None] > thr[None, :]).sum(1)
    else:
        rank = (x.abs()[:, None] > thr[None, :]).sum(1)
        want = torch.tensor(nf4.FP4_RANK_TO_INDEX)[rank] + 8 * (x < 0).long()
    assert torch.equal(got, want)
    # the chosen code value is a nearest one (ties and float32 midpoint rounding aside)
    code = nf4.code_table(qt)
    dist = (x[:, None] - code[None, :]).abs()
    chosen = dist.gather(1, got[:, None]).squeeze(1)
    assert bool((chosen <= dist.min(1).values + 1e-6).all())


def test_nan_scaled_value_gives_index_zero():
    x = torch.tensor([float("nan"), 0.0, -0.0])
    assert nf4.encode_4bit_ref(x, "nf4").tolist() == [0, 7, 7]
    assert nf4.encode_4bit_ref(x, "fp4").tolist() == [0, 0, 0]


@given(seed=st.integers(0, 2**31 - 1))
def test_8bit_search_picks_a_nearest_map_value(seed):
    g = torch.Generator().manual_seed(seed)
    m = nf4.dynamic_map()
    x = torch.rand(2000, generator=g) * 2 - 1
    x[:50] = m[torch.randint(0, 256, (50,), generator=g)]  # exact map values
    x[50:60] = torch.tensor([-1.0, 1.0, 0.0, -0.0, 1e-9, -1e-9, 0.999, -0.999, 0.5, -0.5])
    q = nf4.quantize_8bit_dynamic_ref(x, m)
    dist = (x[:, None] - m[None, :]).abs()
    chosen = dist.gather(1, q[:, None]).squeeze(1)
    assert bool((chosen <= dist.min(1).values * (1 + 1e-6)).all())
    assert torch.equal(m[q[:50]], x[:50]), "exact map values map to themselves"


# ---- Triton (interpreter on CPU) == reference --------------------------------------------------

shapes = st.one_of(
    st.tuples(st.integers(1, 2500)),
    st.tuples(st.integers(1, 40), st.integers(1, 130)),
)


@given(
    shape=shapes,
    blocksize=st.sampled_from(nf4.BLOCKSIZES),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    qt=st.sampled_from(nf4.QUANT_TYPES),
    dq=st.booleans(),
    scale=st.sampled_from([1e-3, 1.0, 300.0]),
    zero_block=st.one_of(st.none(), st.integers(0, 100)),
    seed=st.integers(0, 2**31 - 1),
)
def test_triton_matches_reference_bit_for_bit(
    shape, blocksize, dtype, qt, dq, scale, zero_block, seed
):
    w = _weight(shape, dtype, seed, scale, zero_block, blocksize).to(DEV)
    pr, sr = nf4.quantize_4bit_ref(w, blocksize, qt, dq)
    pt, st_ = _triton_quantize(w, blocksize, qt, dq)
    assert pt.shape == ((w.numel() + 1) // 2, 1) and pt.dtype == torch.uint8
    assert torch.equal(pr.cpu(), pt.cpu()), "packed bytes differ"
    _assert_same_state(sr, st_)
    for out_dtype in (None, torch.float32):
        dr = nf4.dequantize_4bit_ref(pr, sr, dtype=out_dtype)
        dt = _triton_dequantize(pt, st_, dtype=out_dtype)
        assert dt.dtype == (out_dtype or dtype) and dt.shape == w.shape
        assert torch.equal(dr.cpu(), dt.cpu()), "dequantized values differ"


@pytest.mark.parametrize(
    "cfg", nf4._DEQUANT_CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items())
)
def test_every_dequant_config_matches_reference(cfg):
    """Both nibble-expansion schemes and every tile configuration, ragged tails too."""
    cases = (
        ((3, 1399), 64, "nf4", True),
        ((4099,), 4096, "fp4", False),
        ((6, 512), 32, "nf4", True),
    )
    for shape, bs, qt, dq in cases:
        w = _weight(shape, torch.float32, 7, 1.0).to(DEV)
        p, s = nf4.quantize_4bit_ref(w, bs, qt, dq)
        want = nf4.dequantize_4bit_ref(p, s, dtype=torch.float16)
        with qkern.backend("triton"):
            got = nf4._dequantize_4bit_triton(p, s, None, torch.float16, config=cfg)
        assert torch.equal(got.cpu(), want.cpu())


@pytest.mark.parametrize(
    "cfg",
    [c for c in nf4._DEQUANT_CONFIGS if c.get("PER_SM")],
    ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()),
)
def test_persistent_grid_covers_every_tile(cfg, monkeypatch):
    """The grid-stride loop: with one SM, PER_SM programs loop over 9-33 tiles, the last one
    ragged and n odd; every output written (poisoned buffer), bit-exact."""
    monkeypatch.setattr(nf4, "_sm_count", lambda device: 1)
    n = 8 * 4096 * 2 + 1001
    w = _weight((n,), torch.float32, 8).to(DEV)
    for dq in (True, False):
        p, s = nf4.quantize_4bit_ref(w, 64, "nf4", dq)
        want = nf4.dequantize_4bit_ref(p, s, dtype=torch.float16)
        grid, meta, _ = nf4._dequant_meta(nf4._plan_for(p, s), cfg, True)
        assert meta["PERSIST"] and grid[0] == cfg["PER_SM"] < triton_cdiv(n, cfg["ELEMS"])
        out = poisoned((n,), torch.float16, DEV)
        with qkern.backend("triton"):
            got = nf4._dequantize_4bit_triton(p, s, out, None, config=cfg)
        assert torch.equal(got.cpu(), want.cpu())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_misaligned_buffers_take_the_elementwise_paths(dtype):
    """An input or output that starts mid-word cannot be viewed as pairs: the kernels fall back
    to strided loads / per-output stores, with the same results."""
    n = 2 * 700
    base = _weight((n + 1,), dtype, 9).to(DEV)
    w = base[1:].view(20, 70)  # data pointer one element past a word boundary
    assert w.data_ptr() % (2 * w.element_size()) != 0
    pr, sr = nf4.quantize_4bit_ref(w, 64, "nf4", True)
    pt, stt = _triton_quantize(w, 64, "nf4", True)
    assert torch.equal(pr.cpu(), pt.cpu())
    _assert_same_state(sr, stt)
    out = poisoned((n + 1,), dtype, DEV)[1:].view(20, 70)
    got = _triton_dequantize(pt, stt, out=out)
    assert torch.equal(got.cpu(), nf4.dequantize_4bit_ref(pr, sr).cpu())


def test_public_functions_dispatch_to_triton_when_forced():
    w = _weight((5, 77), torch.float16, 3).to(DEV)
    p_ref, s_ref = nf4.quantize_4bit_ref(w, 64, "nf4", True)
    with qkern.backend("triton"):
        p, s = qkern.quantize_4bit(w, blocksize=64)
        d = qkern.dequantize_4bit(p, s)
    if DEV == "cpu":  # the GPU default reciprocal is bitsandbytes' (see test_nf4_bnb.py)
        assert torch.equal(p, p_ref)
        _assert_same_state(s, s_ref)
    assert torch.equal(d.cpu(), nf4.dequantize_4bit_ref(p, s).cpu())


# ---- specific format cases -----------------------------------------------------------------


@pytest.mark.parametrize("qt,pad", [("nf4", 0b0111), ("fp4", 0b0000)])
def test_odd_n_pads_with_the_code_of_zero(qt, pad):
    w = torch.tensor([0.5, -1.0, 0.25], device=DEV)
    for p, _ in (nf4.quantize_4bit_ref(w, 64, qt, False), _triton_quantize(w, 64, qt, False)):
        assert p.shape == (2, 1)
        assert p.view(-1)[1].item() & 15 == pad


def test_packing_is_high_nibble_first():
    w = torch.tensor([-1.0, 1.0, 0.0, -1.0], device=DEV)
    p, _ = nf4.quantize_4bit_ref(w, 64, "nf4", False)
    assert p.view(-1).tolist() == [0x0F, 0x70]
    p2, _ = _triton_quantize(w, 64, "nf4", False)
    assert torch.equal(p.cpu(), p2.cpu())


def test_values_exactly_on_thresholds_take_the_lower_code():
    # absmax 1.0 makes the scale exact, so the scaled values are the thresholds themselves
    thr = list(nf4.NF4_THRESHOLDS)
    w = torch.tensor(thr + [1.0], device=DEV)
    for p, _ in (nf4.quantize_4bit_ref(w, 32, "nf4", False), _triton_quantize(w, 32, "nf4", False)):
        idx = nf4.unpack_4bit_ref(p.cpu(), w.numel())
        assert idx[:15].tolist() == list(range(15))


def _ulp_neighbours(values, k: int) -> torch.Tensor:
    """Every float32 within k ulps of each value (the values themselves included)."""
    bits = torch.tensor(values, dtype=torch.float32).view(torch.int32).long()
    steps = torch.arange(-k, k + 1)
    near = (bits[:, None] + steps[None, :]).reshape(-1)
    return near.to(torch.int32).view(torch.float32)


def _nf4_search_points() -> torch.Tensor:
    """Scaled values where an NF4 search can go wrong: on and next to every threshold and every
    bucket edge of the lookup ((k - 16.5) / 16), at +-0, +-1, and just beyond +-1."""
    edges = [(k - 16.5) / 16 for k in range(34)]
    pts = _ulp_neighbours(list(nf4.NF4_THRESHOLDS) + edges + [-1.0, 1.0, 0.0], 40)
    tiny = torch.arange(0, 64, dtype=torch.int32).view(torch.float32)  # +0 and subnormals
    pts = torch.cat([pts, tiny, -tiny])
    return pts[pts.abs() <= 1.0 + 2**-20]


def test_nf4_bucket_table_counts_thresholds_exactly():
    """The kernel's NF4 search (bucket from the float32 16*s + 2^23 + 16, one table entry, one
    compare), emulated in float32: equal to the count of thresholds strictly below s."""
    g = torch.Generator().manual_seed(0)
    s = torch.cat([_nf4_search_points(), torch.rand(200_000, generator=g) * 2 - 1])
    table = nf4._table_cpu("nf4_lookup")
    u = s * 16.0 + torch.tensor(8388624.0)
    e = table[(u.view(torch.int32) & 63).long()]
    t = (e & 0xFFFFFFFF).to(torch.int32).view(torch.float32)  # low word, reinterpreted
    got = (e >> 32) + (s > t).long()
    want = (s[:, None] > torch.tensor(nf4.NF4_THRESHOLDS)[None, :]).sum(1)
    assert torch.equal(got, want), s[got != want][:5]
    assert table.numel() == 64 and (table[33:] >> 32).eq(0).all()


@pytest.mark.skipif(
    os.environ.get("QKERN_EXHAUSTIVE") != "1", reason="minutes of CPU: set QKERN_EXHAUSTIVE=1"
)
def test_nf4_bucket_table_exhaustive():
    """The emulated bucket search against the threshold count for every float32 in
    [-1.0001, 1.0001] (2.1e9 values; the kernel's scaled values never leave that range)."""
    table = nf4._table_cpu("nf4_lookup")
    t_all = (table & 0xFFFFFFFF).to(torch.int32).view(torch.float32)
    c_all = table >> 32
    thr = torch.tensor(nf4.NF4_THRESHOLDS)
    top = torch.tensor(1.0001).view(torch.int32).item()
    step = 1 << 24
    for sign in (0, -(2**31)):
        for lo in range(0, top + 1, step):
            bits = torch.arange(lo, min(lo + step, top + 1), dtype=torch.int64) + sign
            s = bits.to(torch.int32).view(torch.float32)
            k = ((s * 16.0 + torch.tensor(8388624.0)).view(torch.int32) & 63).long()
            got = c_all[k] + (s > t_all[k]).long()
            assert torch.equal(got, torch.searchsorted(thr, s, right=False)), (sign, lo)


@pytest.mark.parametrize("qt", nf4.QUANT_TYPES)
def test_kernel_search_near_thresholds_and_bucket_edges(qt):
    """Through the quantize kernel: blocks of 32 holding 1.0 (absmax 1, so the scaled values are
    the inputs themselves) and 31 values on or a few ulps from a threshold or bucket edge."""
    pts = _nf4_search_points()
    if qt == "fp4":
        pts = torch.cat([_ulp_neighbours(list(nf4.FP4_THRESHOLDS), 40), pts])
        pts = torch.cat([pts, -pts])
    pts = pts[pts.abs() <= 1.0]  # so that each block's absmax stays 1
    pts = pts[torch.randperm(pts.numel(), generator=torch.Generator().manual_seed(1))]
    nb = -(-pts.numel() // 31)
    blocks = torch.zeros(nb, 32)
    blocks[:, 0] = 1.0
    slots = (torch.arange(nb * 32) % 32 != 0).nonzero().view(-1)[: pts.numel()]
    blocks.view(-1)[slots] = pts
    w = blocks.reshape(-1).to(DEV)
    pr, _ = nf4.quantize_4bit_ref(w, 32, qt, False)
    pt, _ = _triton_quantize(w, 32, qt, False)
    assert torch.equal(pr.cpu(), pt.cpu())
    if qt == "nf4":
        idx = nf4.unpack_4bit_ref(pt.cpu(), w.numel())
        want = (w.cpu()[:, None] > torch.tensor(nf4.NF4_THRESHOLDS)[None, :]).sum(1)
        assert torch.equal(idx, want)


def test_block_with_infinite_reciprocal_gets_index_zero():
    """A block whose absmax is so small that 1/absmax overflows (all zero, or below 2^-128)
    encodes every element as index 0, in the reference and in the kernel."""
    w = torch.randn(4, 64)
    w[1] = torch.randn(64) * 1e-40  # subnormal absmax: 1/absmax = inf
    w[2] = 0.0
    w[3] = torch.randn(64) * 1e-38  # finite reciprocal: quantized normally
    w = w.to(DEV)
    for qt in nf4.QUANT_TYPES:
        pr, _ = nf4.quantize_4bit_ref(w, 64, qt, False)
        pt, _ = _triton_quantize(w, 64, qt, False)
        assert torch.equal(pr.cpu(), pt.cpu())
        rows = pr.view(4, 32).cpu()
        assert rows[1].eq(0).all() and rows[2].eq(0).all()
        assert rows[3].ne(0).any() and rows[0].ne(0).any()


@pytest.mark.parametrize("qt", nf4.QUANT_TYPES)
def test_all_zero_block_follows_bnb(qt):
    """absmax 0 -> 0 * inf = NaN -> index 0 for every element of the block (bitsandbytes'
    fast-math CUDA result); with double quant the block's absmax comes back as a small
    nonzero value, which dequantizes index 0 to -absmax' (NF4) or 0 (FP4)."""
    w = torch.randn(4, 64)
    w[1] = 0
    w = w.to(DEV)
    for dq in (False, True):
        p, s = nf4.quantize_4bit_ref(w, 64, qt, dq)
        pt, stt = _triton_quantize(w, 64, qt, dq)
        assert torch.equal(p.cpu(), pt.cpu())
        assert p.view(4, 32)[1].eq(0).all(), "block 1 is all index 0"
        d = nf4.dequantize_4bit_ref(p, s)
        a = s.dequantized_absmax()[1].item()
        want = -a if qt == "nf4" else 0.0
        assert torch.all(d[1] == want)


def test_single_block_double_quant_keeps_absmax_exact():
    """One block: absmax - mean = 0, nested absmax 0, code 0; dequantized absmax = offset."""
    w = torch.randn(50, device=DEV)
    p, s = nf4.quantize_4bit_ref(w, 64, "nf4", True)
    assert s.nested_absmax.tolist() == [0.0]
    assert s.dequantized_absmax().item() == w.abs().max().item() == s.offset


# ---- round-trip error bound ----------------------------------------------------------------


def _half_max_gap(qt: str) -> float:
    c = sorted(nf4.code_table(qt).unique().tolist())
    return max(b - a for a, b in zip(c[:-1], c[1:])) / 2


@given(
    shape=shapes,
    blocksize=st.sampled_from(nf4.BLOCKSIZES),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    qt=st.sampled_from(nf4.QUANT_TYPES),
    dq=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_error_bound(shape, blocksize, dtype, qt, dq, seed):
    """|x - deq(q(x))| <= half the largest code gap * absmax_b, + the double-quant error of the
    block scale (|code| <= 1), + the rounding of the output dtype."""
    w = _weight(shape, dtype, seed, 2.0, blocksize=blocksize)
    p, s = nf4.quantize_4bit_ref(w, blocksize, qt, dq)
    d = nf4.dequantize_4bit_ref(p, s).float().reshape(-1)
    x = w.float().reshape(-1)
    n = x.numel()
    a_true = torch.zeros(s.n_blocks * blocksize)
    a_true[:n] = x.abs()
    a_true = a_true.view(s.n_blocks, blocksize).amax(1)
    a_used = s.dequantized_absmax()
    per_elem = lambda t: t.repeat_interleave(blocksize)[:n]  # noqa: E731
    eps = torch.finfo(dtype).eps
    bound = (
        _half_max_gap(qt) * per_elem(a_true) * (1 + 1e-6)
        + per_elem((a_true - a_used).abs())
        + d.abs() * eps
        + 1e-30
    )
    err = (x - d).abs()
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"


# ---- bitsandbytes serialization ------------------------------------------------------------


@pytest.mark.parametrize("dq", [True, False])
@pytest.mark.parametrize("qt", nf4.QUANT_TYPES)
def test_bnb_dict_round_trip(tmp_path, qt, dq):
    from safetensors.torch import load_file, save_file

    w = _weight((13, 50), torch.bfloat16, 11)
    p, s = nf4.quantize_4bit_ref(w, 128, qt, dq)
    prefix = "model.layers.0.self_attn.q_proj.weight"
    d = s.as_bnb_dict(prefix, packed=p)
    keys = {k[len(prefix) :] for k in d}
    want = {"", ".absmax", ".quant_map", f".quant_state.bitsandbytes__{qt}"}
    if dq:
        want |= {".nested_absmax", ".nested_quant_map"}
    assert keys == want
    assert d[f"{prefix}.absmax"].dtype == (torch.uint8 if dq else torch.float32)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in d.items()}, str(path))
    loaded = load_file(str(path))
    s2 = nf4.QuantState.from_bnb_dict(loaded, prefix)
    _assert_same_state(s, s2)
    assert torch.equal(loaded[prefix], p)
    assert torch.equal(nf4.dequantize_4bit(loaded[prefix], s2), nf4.dequantize_4bit(p, s))
    # a trailing dot on the prefix means the same thing
    _assert_same_state(s, nf4.QuantState.from_bnb_dict(loaded, prefix + "."))


def test_bnb_json_fields_and_order():
    w = torch.randn(3, 70, dtype=torch.float16)
    _, s = nf4.quantize_4bit_ref(w, 64, "nf4", True)
    blob = s.as_bnb_dict("x.weight")["x.weight.quant_state.bitsandbytes__nf4"]
    assert blob.dtype == torch.uint8 and blob.dim() == 1
    meta = json.loads(bytes(blob.tolist()).decode())
    assert list(meta) == [
        "quant_type",
        "blocksize",
        "dtype",
        "shape",
        "nested_blocksize",
        "nested_dtype",
        "nested_offset",
    ]
    assert meta["dtype"] == "float16" and meta["shape"] == [3, 70] and meta["blocksize"] == 64
    assert meta["nested_blocksize"] == 256 and meta["nested_dtype"] == "float32"
    assert meta["nested_offset"] == s.offset


def _bnb_dict(qt="nf4", dq=True):
    w = torch.randn(4, 64)
    p, s = nf4.quantize_4bit_ref(w, 64, qt, dq)
    return dict(s.as_bnb_dict("m.weight", packed=p))


def _set_json(d, key, **changes):
    meta = json.loads(bytes(d[key].tolist()).decode())
    meta.update(changes)
    d[key] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)


def test_from_bnb_dict_errors():
    d = _bnb_dict()
    qs = "m.weight.quant_state.bitsandbytes__nf4"
    bad = dict(d)
    bad["m.weight.quant_state.bitsandbytes__int4"] = bad.pop(qs)
    with pytest.raises(ValueError, match="unknown quant_type in checkpoint key"):
        nf4.QuantState.from_bnb_dict(bad, "m.weight")
    bad = dict(d)
    _set_json(bad, qs, quant_type="int4")
    with pytest.raises(ValueError, match="unknown quant_type 'int4'"):
        nf4.QuantState.from_bnb_dict(bad, "m.weight")
    with pytest.raises(ValueError, match="exactly one"):
        nf4.QuantState.from_bnb_dict(d, "other.weight")
    bad = dict(d)
    del bad["m.weight.nested_absmax"]
    with pytest.raises(ValueError, match="missing key 'm.weight.nested_absmax'"):
        nf4.QuantState.from_bnb_dict(bad, "m.weight")
    bad = dict(d)
    bad["m.weight.absmax"] = bad["m.weight.absmax"][:-1]
    with pytest.raises(ValueError, match="absmax' has 3 elements"):
        nf4.QuantState.from_bnb_dict(bad, "m.weight")
    bad = dict(d)
    bad["m.weight.quant_map"] = bad["m.weight.quant_map"] * 2
    with pytest.raises(ValueError, match="not the standard nf4 code table"):
        nf4.QuantState.from_bnb_dict(bad, "m.weight")
    bad = dict(d)
    _set_json(bad, qs, blocksize=48)
    with pytest.raises(ValueError, match="blocksize in checkpoint must be one of"):
        nf4.QuantState.from_bnb_dict(bad, "m.weight")
    bad = dict(d)
    bad[qs] = torch.tensor(list(b"not json"), dtype=torch.uint8)
    with pytest.raises(ValueError, match="not a JSON quant-state blob"):
        nf4.QuantState.from_bnb_dict(bad, "m.weight")


# ---- caller-provided buffers ---------------------------------------------------------------


@pytest.mark.parametrize("path", ["reference", "triton"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_poisoned_out_buffer_is_fully_written(path, out_dtype):
    w = _weight((7, 131), torch.float32, 5).to(DEV)
    p, s = nf4.quantize_4bit_ref(w, 64, "nf4", True)
    want = nf4.dequantize_4bit_ref(p, s, dtype=out_dtype)
    out = poisoned(w.shape, out_dtype, DEV)
    with qkern.backend(path):
        got = nf4.dequantize_4bit(p, s, out=out)
    assert got is out
    assert not torch.isnan(out).any()
    assert torch.equal(out.cpu(), want.cpu())


# ---- state helpers ---------------------------------------------------------------------------


def test_state_helpers():
    w = torch.randn(3, 100, dtype=torch.bfloat16)
    p, s = nf4.quantize_4bit_ref(w, 64, "fp4", True)
    assert s.numel() == 300 and s.n_blocks == 5 and s.double_quant
    assert s.dequantized_absmax().dtype == torch.float32 and s.dequantized_absmax().numel() == 5
    moved = s.to("cpu")
    _assert_same_state(s, moved)
    assert not nf4.quantize_4bit_ref(w, 64, "fp4", False)[1].double_quant


# ---- bad input -------------------------------------------------------------------------------


def test_quantize_bad_inputs():
    w = torch.randn(4, 64)
    with pytest.raises(TypeError, match="w must have dtype"):
        qkern.quantize_4bit(w.to(torch.int32))
    with pytest.raises(TypeError, match="w must be a torch.Tensor"):
        qkern.quantize_4bit([1.0, 2.0])
    with pytest.raises(ValueError, match="w is empty"):
        qkern.quantize_4bit(torch.empty(0, 64))
    with pytest.raises(ValueError, match="blocksize must be one of"):
        qkern.quantize_4bit(w, blocksize=16)
    with pytest.raises(ValueError, match="quant_type must be 'nf4' or 'fp4'"):
        qkern.quantize_4bit(w, quant_type="int4")
    for bad in (float("nan"), float("inf"), -float("inf")):
        w2 = w.clone()
        w2[2, 5] = bad
        for path in ("reference", "triton"):
            for dq in (True, False):
                with qkern.backend(path), pytest.raises(ValueError, match="NaN or Inf"):
                    _, s = qkern.quantize_4bit(w2.to(DEV), compress_statistics=dq)
                    # the Triton quantizer does not wait for the GPU: the check comes back
                    # with the offset (or the largest absmax), on the state's first use
                    assert path == "triton", "the reference raises in quantize_4bit"
                    s.offset  # noqa: B018


@pytest.mark.parametrize("dq", [True, False])
def test_deferred_nonfinite_error_on_every_use_of_the_state(dq):
    """The Triton path returns before the GPU has finished; a NaN/Inf weight then raises on
    every use of the state (offset, dequantization, serialization, copies), and keeps raising;
    assigning an offset replaces the pending value (without double quant: None, no check)."""
    from dataclasses import replace

    w = torch.randn(4, 64)
    w[3, 7] = float("inf")
    with qkern.backend("triton"):
        p, s = qkern.quantize_4bit(w.to(DEV), compress_statistics=dq)
        uses = (
            lambda: s.offset,
            lambda: qkern.dequantize_4bit(p, s),
            lambda: s.as_bnb_dict("w.weight"),
            lambda: s.to(DEV),
            lambda: replace(s),
            lambda: copy.deepcopy(s),
            lambda: s.dequantized_absmax(),
        )
        for use in uses + uses:
            with pytest.raises(ValueError, match="NaN or Inf"):
                use()
        value = 0.5 if dq else None
        s.offset = value
        assert s.offset == value and qkern.dequantize_4bit(p, s).shape == w.shape


def test_pending_offset_reads_back_once_and_copies():
    """A finite weight: the Triton quantizer's pending offset equals the reference's, is read
    back by the state's serialization (__getstate__, which deepcopy and pickling share) as a float,
    and a state serialized with a plain offset attribute loads. (Round trips use deepcopy: the
    project never loads pickles.)"""

    w = _weight((5, 128), torch.float32, 12).to(DEV)
    _, sr = nf4.quantize_4bit_ref(w, 64, "nf4", True)
    _, st_ = _triton_quantize(w, 64, "nf4", True)
    assert "_pending_offset" in st_.__dict__
    again = copy.deepcopy(st_)
    assert "_pending_offset" not in st_.__dict__ and isinstance(st_.offset, float)
    assert again.offset == st_.offset == sr.offset
    old_style = dict(again.__dict__)
    old_style["offset"] = old_style.pop("_offset")
    revived = nf4.QuantState.__new__(nf4.QuantState)
    revived.__setstate__(old_style)
    assert revived.offset == sr.offset
    # without double quant the pending value is the finite check: settled to offset None
    _, s2 = _triton_quantize(w, 64, "nf4", False)
    assert "_pending_offset" in s2.__dict__
    again = copy.deepcopy(s2)
    assert "_pending_offset" not in s2.__dict__ and s2.offset is None and again.offset is None


def test_dequantize_bad_inputs():
    w = torch.randn(4, 64)
    p, s = nf4.quantize_4bit_ref(w, 64, "nf4", True)
    with pytest.raises(TypeError, match="packed must be uint8"):
        qkern.dequantize_4bit(p.to(torch.int8), s)
    with pytest.raises(TypeError, match="state must be a QuantState"):
        qkern.dequantize_4bit(p, {"absmax": s.absmax})
    with pytest.raises(ValueError, match="does not belong to this packed tensor"):
        qkern.dequantize_4bit(p[:-1], s)
    with pytest.raises(ValueError, match="must be on one device"):
        qkern.dequantize_4bit(p, s.to("meta"))
    with pytest.raises(ValueError, match="out has shape"):
        qkern.dequantize_4bit(p, s, out=torch.empty(64, 4))
    with pytest.raises(ValueError, match="dtype=torch.float16 was asked for"):
        qkern.dequantize_4bit(p, s, out=torch.empty(4, 64), dtype=torch.float16)
    with pytest.raises(ValueError, match="out must be contiguous"):
        qkern.dequantize_4bit(p, s, out=torch.empty(64, 4).t())
    with pytest.raises(TypeError, match="dtype must be float32, float16 or bfloat16"):
        qkern.dequantize_4bit(p, s, dtype=torch.int32)
    from dataclasses import replace

    with pytest.raises(ValueError, match="state.absmax must be uint8 codes"):
        qkern.dequantize_4bit(p, replace(s, absmax=s.absmax.float()))
    with pytest.raises(ValueError, match="state.blocksize must be one of"):
        qkern.dequantize_4bit(p, replace(s, blocksize=100))
    with pytest.raises(ValueError, match="quant_type must be"):
        qkern.dequantize_4bit(p, replace(s, quant_type="int4"))
    with pytest.raises(ValueError, match="state.offset must be set"):
        qkern.dequantize_4bit(p, replace(s, offset=None))
    with pytest.raises(ValueError, match=r"state.absmax has 3 entries"):
        qkern.dequantize_4bit(p, replace(s, absmax=s.absmax[:3]))


# ---- host path: cached launch arguments, lean checks, direct launches -------------------------


def _cached_state(dq=True):
    w = _weight((7, 131), torch.float32, 21).to(DEV)
    p, s = nf4.quantize_4bit_ref(w, 64, "nf4", dq)
    return p, s


@pytest.mark.parametrize("path", ["triton", "reference"])
def test_cached_state_still_rejects_mismatched_inputs(path):
    """After a state's launch arguments are cached, the per-call checks (integer and identity
    compares) still reject every mismatch the full validation rejects, with the same errors."""
    p, s = _cached_state()
    want = nf4.dequantize_4bit_ref(p, s)
    with qkern.backend(path):
        assert torch.equal(nf4.dequantize_4bit(p, s).cpu(), want.cpu())
        plan = s._plan
        assert plan is not None
        assert torch.equal(nf4.dequantize_4bit(p, s).cpu(), want.cpu())
        assert s._plan is plan, "the second call reuses the cached plan"
        with pytest.raises(ValueError, match="does not belong to this packed tensor"):
            nf4.dequantize_4bit(p[:-1], s)
        with pytest.raises(ValueError, match="does not belong to this packed tensor"):
            nf4.dequantize_4bit(torch.cat([p, p]), s)
        with pytest.raises(TypeError, match="packed must be uint8"):
            nf4.dequantize_4bit(p.to(torch.int8), s)
        with pytest.raises(TypeError, match="packed must be a torch.Tensor"):
            nf4.dequantize_4bit(p.tolist(), s)
        with pytest.raises(ValueError, match="must be on one device"):
            nf4.dequantize_4bit(p.to("meta"), s)
        with pytest.raises(ValueError, match="out has shape"):
            nf4.dequantize_4bit(p, s, out=torch.empty(131, 7, device=DEV))
        with pytest.raises(ValueError, match="out is on meta"):
            nf4.dequantize_4bit(p, s, out=torch.empty(7, 131, device="meta"))
        with pytest.raises(ValueError, match="out must be contiguous"):
            nf4.dequantize_4bit(p, s, out=torch.empty(131, 7, device=DEV).t())
        with pytest.raises(TypeError, match="out must have dtype"):
            nf4.dequantize_4bit(p, s, out=torch.empty(7, 131, dtype=torch.int32, device=DEV))
        with pytest.raises(ValueError, match="dtype=torch.float16 was asked for"):
            nf4.dequantize_4bit(p, s, out=torch.empty(7, 131, device=DEV), dtype=torch.float16)
        with pytest.raises(TypeError, match="dtype must be float32, float16 or bfloat16"):
            nf4.dequantize_4bit(p, s, dtype=torch.int32)
        # reassigning a field invalidates the cache: the state is validated again
        good = s.absmax
        s.absmax = good[:3]
        with pytest.raises(ValueError, match="state.absmax has 3 entries"):
            nf4.dequantize_4bit(p, s)
        s.absmax = good
        s.blocksize = 100
        with pytest.raises(ValueError, match="state.blocksize must be one of"):
            nf4.dequantize_4bit(p, s)
        s.blocksize = 64
        s.offset = s.offset * 2.0
        got = nf4.dequantize_4bit(p, s)
        assert s._plan is not plan
        assert torch.equal(got.cpu(), nf4.dequantize_4bit_ref(p, s).cpu())
        assert not torch.equal(got.cpu(), want.cpu()), "the new offset was used"


def test_plan_is_not_copied_with_the_state():
    from dataclasses import replace

    p, s = _cached_state()
    with qkern.backend("triton"):
        nf4.dequantize_4bit(p, s)
    assert s._plan is not None
    assert replace(s)._plan is None and s.to(DEV)._plan is None
    assert copy.deepcopy(s)._plan is None
    assert replace(s) == s, "the cache is not a field"


class _CountOps:
    """Records the aten ops run while active (a torch dispatch mode)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        rec = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if rec.active:
                    rec.ops.append(func.__name__)
                return func(*args, **(kwargs or {}))

        self.mode, self.ops, self.active = Mode(), [], True


class _StubKernel:
    """Stands for a kernel: records launches; ``fill`` (an argument index) gets finite values
    (outside the op count) so that the quantizer's finite check passes."""

    def __init__(self, kernel, counter=None, fill=None):
        self.arg_names = kernel.arg_names
        self.pre_run_hooks = []
        self.calls, self.counter, self.fill = [], counter, fill

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.calls.append((grid, args, meta))
            if self.fill is not None:
                self.counter.active = False
                args[self.fill].fill_(1.0)
                self.counter.active = True

        return launch


def test_hot_paths_run_no_torch_op_but_their_allocations(monkeypatch):
    """dequantize_4bit(out=...) with a cached state: one launch, no torch op (no views, no
    copies, no syncs). quantize: its outputs, torch's mean and two launches with no host sync
    (double quant), or torch's max, one launch and one sync at the end (without); no table
    copies."""
    count = _CountOps()
    stub = _StubKernel(nf4._dequantize_4bit_kernel)
    monkeypatch.setattr(nf4, "_dequantize_4bit_kernel", stub)
    p, s = _cached_state()
    out = torch.empty(7, 131, dtype=torch.float16, device=DEV)
    with qkern.backend("triton"):
        nf4.dequantize_4bit(p, s, out=out)
        with count.mode:
            nf4.dequantize_4bit(p, s, out=out)
            assert count.ops == []
            nf4.dequantize_4bit(p, s, dtype=torch.float32)
        assert count.ops == ["empty.memory_format"]
    assert len(stub.calls) == 3
    grid, args, meta = stub.calls[1]
    assert args[0] is p and args[5] is out and args[6] == 7 * 131
    assert grid == (triton_cdiv(7 * 131, meta["ROWS"] * meta["COLS"]), 1, 1)

    # quantize, a shape seen before (the plan exists): its allocations, torch's mean with
    # double quant, the launches, and nothing else (no views, table copies or host syncs); the
    # state's first use reads the offset back (or, without double quant, checks the largest
    # absmax for NaN)
    w = _weight((16, 256), torch.float32, 3).to(DEV)
    empty, sync = "empty.memory_format", ["_local_scalar_dense.default"]
    monkeypatch.setattr(nf4, "_QUANT_PLANS", {})
    for dq, want, first_use in (
        (True, [empty] * 4 + ["mean.default"], sync),
        (False, [empty] * 2, ["max.default"] + sync),
    ):
        count = _CountOps()
        q1 = _StubKernel(nf4._quantize_4bit_kernel, count, fill=2)  # the block absmax
        q2 = _StubKernel(nf4._quantize_absmax_kernel, count)
        monkeypatch.setattr(nf4, "_quantize_4bit_kernel", q1)
        monkeypatch.setattr(nf4, "_quantize_absmax_kernel", q2)
        with qkern.backend("triton"):
            nf4.quantize_4bit(w, 64, "nf4", dq)  # first call of the shape: builds the plan
            with count.mode:
                _, st_ = nf4.quantize_4bit(w, 64, "nf4", dq)
        assert count.ops == want, count.ops
        assert (len(q1.calls), len(q2.calls)) == (2, 2 * int(dq))
        assert st_.code is nf4._table("nf4", w.device), "no copy of the code table"
        with count.mode:
            assert st_.offset == (1.0 if dq else None)  # the stub's absmax: all ones
            assert st_.offset == (1.0 if dq else None)
        assert count.ops[len(want) :] == first_use, "one read-back, on first use only"


def test_quantize_plan_keeps_every_check(monkeypatch):
    """Once a shape has a plan, calls skip the checks only when they match its whole key: other
    dtypes, blocksizes, quant types, non-tensors and another backend mode get the full checks
    or the reference; non-contiguous and misaligned inputs of the same shape quantize alike."""
    w = _weight((6, 128), torch.float32, 8).to(DEV)
    with qkern.backend("triton"):
        p1, s1 = qkern.quantize_4bit(w)
        p2, s2 = qkern.quantize_4bit(w)
        assert torch.equal(p1.cpu(), p2.cpu())
        _assert_same_state(s1, s2)
        with pytest.raises(TypeError, match="w must have dtype"):
            qkern.quantize_4bit(w.to(torch.int32))
        with pytest.raises(TypeError, match="w must be a torch.Tensor"):
            qkern.quantize_4bit(w.tolist())
        with pytest.raises(ValueError, match="blocksize must be one of"):
            qkern.quantize_4bit(w, blocksize=16)
        with pytest.raises(ValueError, match="quant_type must be 'nf4' or 'fp4'"):
            qkern.quantize_4bit(w, quant_type=["nf4"])  # unhashable: no plan lookup
        strided = torch.empty(128, 6, device=DEV).t()
        strided.copy_(w)
        base = torch.empty(w.numel() + 1, device=DEV)
        shifted = base[1:].view(w.shape)  # pairs of inputs no longer word-aligned
        shifted.copy_(w)
        for x in (strided, shifted):
            px, sx = qkern.quantize_4bit(x)
            assert torch.equal(px.cpu(), p1.cpu())
            _assert_same_state(sx, s1)
    calls = []
    ref = nf4.quantize_4bit_ref
    monkeypatch.setattr(nf4, "quantize_4bit_ref", lambda *a: calls.append(1) or ref(*a))
    with qkern.backend("reference"):
        qkern.quantize_4bit(w)
    assert calls == [1], "the backend mode is part of the plan's key"


def triton_cdiv(a, b):
    return -(-a // b)


def _alias(ptr, like):
    """A tensor over the memory at address ``ptr`` with ``like``'s dtype, size and device: what
    a pointer passed as an int stands for (the array interfaces do not copy)."""
    typestr = {torch.float32: "<f4", torch.float16: "<f2", torch.uint8: "|u1", torch.int64: "<i8"}
    iface = {"shape": (like.numel(),), "typestr": typestr[like.dtype], "data": (ptr, False)}
    if like.is_cuda:
        holder = type("Mem", (), {"__cuda_array_interface__": {**iface, "version": 2}})()
        return torch.as_tensor(holder, device=like.device)
    import numpy as np

    holder = type("Mem", (), {"__array_interface__": {**iface, "version": 3}})()
    return torch.from_numpy(np.asarray(holder))


class _FakeCompiled:
    """Stands for Triton's compiled kernel: ``ck[grid](*every_parameter, stream=...)`` runs the
    kernel with the same arguments (split back into runtime and compile-time ones; a pointer
    passed as an int becomes a tensor over that memory, shaped like the JIT launch's tensor)."""

    packed_metadata = None

    def __init__(self, kernel, jit_args):
        self.kernel, self.jit_args, self.calls, self.fail = kernel, jit_args, 0, False
        self.int_pointers = 0

    def __getitem__(self, grid):
        def runner(*args, stream=None):
            assert stream == 0
            self.calls += 1
            if self.fail:
                raise TypeError("launcher rejected the arguments")
            n_runtime = len(self.jit_args)
            names = self.kernel.arg_names[n_runtime:]
            assert len(args) == len(self.kernel.arg_names)
            runtime = list(args[:n_runtime])
            for i, like in enumerate(self.jit_args):
                if isinstance(like, torch.Tensor) and isinstance(runtime[i], int):
                    runtime[i] = _alias(runtime[i], like)
                    self.int_pointers += 1
            cx = dict(zip(names, args[n_runtime:]))
            self.kernel[grid](*runtime, **cx)

        return runner


class _ReturnsCompiled:
    """A kernel whose launch returns a _FakeCompiled, as JITFunction.run returns its kernel."""

    def __init__(self, kernel):
        self.kernel, self.arg_names, self.pre_run_hooks = kernel, kernel.arg_names, []
        self.jit_calls, self.compiled = 0, []

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.jit_calls += 1
            self.kernel[grid](*args, **meta)
            self.compiled.append(_FakeCompiled(self.kernel, args))
            return self.compiled[-1]

        return launch


class _FakeDriver:
    class active:  # noqa: N801 (mirrors triton.runtime.driver.active)
        @staticmethod
        def get_current_device():
            return 0

        @staticmethod
        def get_current_stream(device):
            return 0


def test_direct_launches_match_the_jit_launch(monkeypatch):
    """The second launch of a cached configuration goes through the kernel the first returned,
    with every parameter in signature order; other alignments get their own entry; a failing
    direct launch falls back to the JIT launch and switches direct launches off."""
    deq = _ReturnsCompiled(nf4._dequantize_4bit_kernel)
    q1 = _ReturnsCompiled(nf4._quantize_4bit_kernel)
    q2 = _ReturnsCompiled(nf4._quantize_absmax_kernel)
    monkeypatch.setattr(nf4, "_dequantize_4bit_kernel", deq)
    monkeypatch.setattr(nf4, "_quantize_4bit_kernel", q1)
    monkeypatch.setattr(nf4, "_quantize_absmax_kernel", q2)
    monkeypatch.setattr(nf4, "_driver", _FakeDriver)
    monkeypatch.setattr(nf4, "_QUANT_PLANS", {})
    monkeypatch.setitem(nf4._DIRECT, "on", True)
    w = _weight((9, 130), torch.float32, 5).to(DEV)
    pr, sr = nf4.quantize_4bit_ref(w, 64, "nf4", True)
    with qkern.backend("triton"):
        for _ in range(3):
            p, s = nf4._quantize_4bit_triton(w, 64, "nf4", True, rcp_mode=nf4.RCP_IEEE)
            assert torch.equal(p.cpu(), pr.cpu())
            _assert_same_state(s, sr)
        assert (q1.jit_calls, q2.jit_calls) == (1, 1)
        assert q1.compiled[0].calls == 2 and q2.compiled[0].calls == 2
        # quantize passes its pointers as integers (5 of them per launch of either kernel)
        assert q1.compiled[0].int_pointers == 2 * 4 and q2.compiled[0].int_pointers == 2 * 5
        # an input whose pairs are not word-aligned: another specialization
        base = torch.empty(w.numel() + 1, device=DEV)
        shifted = base[1:].view(w.shape)
        shifted.copy_(w)
        for _ in range(2):
            p2, s2 = nf4._quantize_4bit_triton(shifted, 64, "nf4", True, rcp_mode=nf4.RCP_IEEE)
            assert torch.equal(p2.cpu(), pr.cpu())
            _assert_same_state(s2, sr)
        assert q1.jit_calls == 2 and q1.compiled[1].calls == 1
        # a failing direct launch: the JIT launch redoes the call, direct launches stop
        q1.compiled[0].fail = True
        p3, s3 = nf4._quantize_4bit_triton(w, 64, "nf4", True, rcp_mode=nf4.RCP_IEEE)
        assert torch.equal(p3.cpu(), pr.cpu())
        _assert_same_state(s3, sr)
        assert q1.jit_calls == 3 and not nf4._DIRECT["on"]
        nf4._DIRECT["on"] = True
        want = nf4.dequantize_4bit_ref(pr, sr, dtype=torch.float16)
        out = poisoned((9, 130), torch.float16, DEV)
        for i in range(3):
            out.fill_(float("nan"))
            assert torch.equal(nf4.dequantize_4bit(p, s, out=out).cpu(), want.cpu())
            assert deq.jit_calls == 1 and deq.compiled[0].calls == i
        # an output 16-byte aligned no more (but still word aligned): another specialization
        base = poisoned((9 * 130 + 2,), torch.float16, DEV)
        shifted = base[2:].view(9, 130)
        assert shifted.data_ptr() % 16 != 0
        for _ in range(2):
            assert torch.equal(nf4.dequantize_4bit(p, s, out=shifted).cpu(), want.cpu())
        assert deq.jit_calls == 2 and deq.compiled[1].calls == 1
        deq.compiled[0].fail = True
        out.fill_(float("nan"))
        assert torch.equal(nf4.dequantize_4bit(p, s, out=out).cpu(), want.cpu())
        assert deq.jit_calls == 3 and not nf4._DIRECT["on"]


# ---- GPU ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("qt", nf4.QUANT_TYPES)
def test_gpu_triton_matches_reference_large(dtype, qt):
    """Large odd shapes, bf16 included: IEEE-mode quantization and dequantization bit-exact."""
    for shape, bs in (((1023, 4097), 64), ((4096, 1000), 256), ((77, 333), 32)):
        w = _weight(shape, dtype, 1, 1.0, zero_block=3, blocksize=bs).cuda()
        for dq in (True, False):
            pr, sr = nf4.quantize_4bit_ref(w, bs, qt, dq)
            pt, stt = nf4._quantize_4bit_triton(w, bs, qt, dq, rcp_mode=nf4.RCP_IEEE)
            assert torch.equal(pr, pt)
            _assert_same_state(sr, stt)
            for out_dtype in (torch.bfloat16, torch.float16, torch.float32):
                want = nf4.dequantize_4bit_ref(pr, sr, dtype=out_dtype)
                out = poisoned(shape, out_dtype, "cuda")
                got = nf4.dequantize_4bit(pt, stt, out=out)
                assert torch.equal(got, want), f"{shape} {bs} dq={dq} -> {out_dtype}"


@pytest.mark.gpu
def test_gpu_default_quantize_differs_from_ieee_only_next_to_thresholds():
    """The GPU default uses the hardware reciprocal; any index that differs from the IEEE result
    must belong to a value whose IEEE-scaled magnitude is within 4 ulps of a threshold."""
    w = _weight((4096, 1024), torch.bfloat16, 2).cuda()
    pa, sa = nf4._quantize_4bit_triton(w, 64, "nf4", False)
    pi, si = nf4._quantize_4bit_triton(w, 64, "nf4", False, rcp_mode=nf4.RCP_IEEE)
    assert torch.equal(sa.absmax, si.absmax)
    ia = nf4.unpack_4bit_ref(pa, w.numel())
    ii = nf4.unpack_4bit_ref(pi, w.numel())
    diff = (ia != ii).nonzero().view(-1)
    if diff.numel():
        x = w.float().view(-1)[diff] * (1.0 / sa.absmax.repeat_interleave(64)[diff])
        thr = torch.tensor(nf4.NF4_THRESHOLDS, device="cuda")
        gap = (x[:, None] - thr[None, :]).abs().min(1).values
        assert bool((gap <= 4 * torch.finfo(torch.float32).eps * x.abs().clamp_min(1e-3)).all())
    print(f"hardware vs IEEE reciprocal: {diff.numel()} of {w.numel()} indices differ")


@pytest.mark.gpu
@pytest.mark.parametrize("dq", [True, False])
def test_gpu_quantize_does_not_sync(dq):
    """quantize_4bit queues its work and returns: CUDA's sync debug mode set to "error" would
    raise on any synchronizing call. The first read of the offset syncs once (without double
    quant: the finite check)."""
    w = _weight((1024, 1024), torch.bfloat16, 3).cuda()
    for _ in range(2):  # compile, then the cached plan and direct launches, outside the check
        nf4.quantize_4bit(w, compress_statistics=dq)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    count = _CountOps()
    try:
        with count.mode:
            p, s = nf4.quantize_4bit(w, compress_statistics=dq)
        with pytest.raises(RuntimeError):
            s.offset  # noqa: B018
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    # the direct launches run no torch op: the call's torch work is its allocations and the mean
    empty = "empty.memory_format"
    assert count.ops == ([empty] * 4 + ["mean.default"] if dq else [empty] * 2), count.ops
    _, sr = nf4.quantize_4bit_ref(w, 64, "nf4", dq)
    assert s.offset == sr.offset


@pytest.mark.gpu
def test_gpu_direct_launches_are_bit_exact():
    """Repeated calls go through the compiled kernels the first calls returned (no Triton
    dispatch): still bit-exact, for fresh and caller buffers, aligned and not, and no direct
    launch has failed over to the JIT launch."""
    assert nf4._DIRECT["on"]
    w = _weight((1023, 4097), torch.bfloat16, 4, zero_block=2).cuda()
    for dq in (True, False):
        pr, sr = nf4.quantize_4bit_ref(w, 64, "nf4", dq)
        for _ in range(3):
            pt, stt = nf4._quantize_4bit_triton(w, 64, "nf4", dq, rcp_mode=nf4.RCP_IEEE)
            assert torch.equal(pr, pt)
            _assert_same_state(sr, stt)
        plan = nf4._QUANT_PLANS[(w.shape, w.dtype, w.device, 64, "nf4", dq, "rcp", nf4.RCP_IEEE)]
        assert plan.direct, "the compiled quantize kernels were kept"
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            want = nf4.dequantize_4bit_ref(pr, sr, dtype=dtype)
            out = poisoned(w.shape, dtype, "cuda")
            shifted = poisoned((w.numel() + 2,), dtype, "cuda")[2:].view(w.shape)
            for _ in range(3):
                for buf in (out, shifted):
                    buf.fill_(float("nan"))
                    assert torch.equal(nf4.dequantize_4bit(pt, stt, out=buf), want)
                assert torch.equal(nf4.dequantize_4bit(pt, stt, dtype=dtype), want)
        assert all(entry[2] for entry in stt._plan.launches.values()), "compiled kernels kept"
    assert nf4._DIRECT["on"], "a direct launch failed; the JIT launch took over"


@pytest.mark.gpu
def test_gpu_measured_config_for_large_n(monkeypatch):
    """The once-per-shape timing that picks the tile for large weights (threshold lowered)."""
    monkeypatch.setattr(nf4, "_TUNE_MIN_N", 1 << 20)
    monkeypatch.setattr(nf4, "_TUNED", {})
    w = _weight((2048, 1024), torch.bfloat16, 6).cuda()
    p, s = nf4.quantize_4bit_ref(w, 64, "nf4", True)
    want = nf4.dequantize_4bit_ref(p, s)
    assert torch.equal(nf4.dequantize_4bit(p, s), want)
    assert torch.equal(nf4.dequantize_4bit(p, s), want)
    assert len(nf4._TUNED) == 1
    assert next(iter(nf4._TUNED.values())) in nf4._TUNE_CONFIGS
