"""Bit-exactness of qkern.nf4 with bitsandbytes.

(a) CPU, every CI run: the committed fixtures in tests/fixtures/nf4/ were written by bitsandbytes
    on a GPU (bench/make_bnb_fixtures.py). Our quantizer must reproduce bitsandbytes' packed bytes,
    block absmax, 8-bit absmax codes and nested absmax; our dequantization of bitsandbytes' state
    must reproduce its output bit for bit — through the reference and through the Triton kernels
    (interpreter).
(b) GPU: live comparison with bitsandbytes.functional.quantize_4bit / dequantize_4bit when
    bitsandbytes imports, with our GPU default (hardware reciprocal, as bitsandbytes' fast-math
    build). Mismatches are reported with their distance to the nearest decision threshold, so a
    failure says whether it is only values on a midpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import kernel_device

import qkern
from qkern import nf4

FIXTURES = Path(__file__).parent / "fixtures" / "nf4"
PREFIX = "w.weight"
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _fixture_files() -> list[Path]:
    return sorted(FIXTURES.glob("*.safetensors")) if FIXTURES.is_dir() else []


def _threshold_distance_ulps(scaled: torch.Tensor, qt: str) -> torch.Tensor:
    """Distance (in float32 ulps of the value) from each scaled value to the nearest threshold."""
    thr = torch.tensor(
        nf4.NF4_THRESHOLDS if qt == "nf4" else nf4.FP4_THRESHOLDS, device=scaled.device
    )
    x = scaled if qt == "nf4" else scaled.abs()
    gap = (x[:, None] - thr[None, :]).abs().min(1).values
    ulp = torch.finfo(torch.float32).eps * x.abs().clamp_min(torch.finfo(torch.float32).tiny)
    return gap / ulp


def _explain_packed(ours, theirs, w, absmax, blocksize, qt) -> str:
    """Empty if equal; else how many 4-bit indices differ and how close to a threshold they are."""
    n = w.numel()
    a = nf4.unpack_4bit_ref(ours.reshape(-1).cpu(), n)
    b = nf4.unpack_4bit_ref(theirs.reshape(-1).cpu(), n)
    bad = (a != b).nonzero().view(-1)
    if bad.numel() == 0:
        return ""
    x = w.reshape(-1).float().cpu()[bad]
    am = absmax.float().cpu().repeat_interleave(blocksize)[bad]
    ulps = _threshold_distance_ulps(x * (1.0 / am), qt)
    return (
        f"{bad.numel()}/{n} indices differ (first at {bad[:5].tolist()}: ours "
        f"{a[bad[:5]].tolist()} bnb {b[bad[:5]].tolist()}); distance to nearest threshold "
        f"in ulps: max {ulps.max().item():.3g} -> "
        + ("only values on a midpoint" if ulps.max() <= 4 else "NOT only midpoint values")
    )


def _explain_codes(ours: torch.Tensor, theirs: torch.Tensor, name: str) -> str:
    bad = (ours.cpu() != theirs.cpu()).nonzero().view(-1)
    if bad.numel() == 0:
        return ""
    return (
        f"{name}: {bad.numel()}/{ours.numel()} differ, first at {bad[:5].tolist()}: ours "
        f"{ours.cpu()[bad[:5]].tolist()} bnb {theirs.cpu()[bad[:5]].tolist()}"
    )


def _explain_values(ours: torch.Tensor, theirs: torch.Tensor, name: str) -> str:
    o, t = ours.reshape(-1).cpu(), theirs.reshape(-1).cpu()
    bad = ((o != t) & ~(o.isnan() & t.isnan())).nonzero().view(-1)
    if bad.numel() == 0:
        return ""
    return (
        f"{name}: {bad.numel()}/{o.numel()} differ, first at {bad[:5].tolist()}: ours "
        f"{o[bad[:5]].tolist()} bnb {t[bad[:5]].tolist()}"
    )


def _ulps_apart(a: float, b: float) -> int:
    ia = torch.tensor(a, dtype=torch.float32).view(torch.int32).item()
    ib = torch.tensor(b, dtype=torch.float32).view(torch.int32).item()
    return abs(ia - ib)


# ---- (a) committed fixtures, CPU -----------------------------------------------------------


def test_fixtures_present():
    if not FIXTURES.is_dir():
        pytest.skip(
            "tests/fixtures/nf4/ does not exist yet: generate it on a GPU with bitsandbytes "
            "via `python3 bench/make_bnb_fixtures.py tests/fixtures/nf4`"
        )
    assert _fixture_files(), (
        "tests/fixtures/nf4/ exists but holds no *.safetensors fixtures: they are missing; "
        "regenerate with `python3 bench/make_bnb_fixtures.py tests/fixtures/nf4` on a GPU"
    )


def _load(path: Path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    return load_file(str(path)), meta


@pytest.mark.parametrize("path", _fixture_files(), ids=lambda p: p.stem)
def test_fixture_dynamic_map(path):
    t, _ = _load(path)
    assert torch.equal(nf4.dynamic_map(), t["dynamic_map"]), _explain_values(
        nf4.dynamic_map(), t["dynamic_map"], "dynamic map"
    )


@pytest.mark.parametrize("path", _fixture_files(), ids=lambda p: p.stem)
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_fixture_quantize_reproduces_bnb(path, impl):
    t, meta = _load(path)
    w = t["input"]
    bs, qt, dq = int(meta["blocksize"]), meta["quant_type"], meta["double_quant"] == "True"
    bnb_state = nf4.QuantState.from_bnb_dict(t, PREFIX)
    assert bnb_state.double_quant == dq and bnb_state.blocksize == bs
    assert bnb_state.shape == w.shape and bnb_state.dtype == w.dtype

    if impl == "triton" and w.dtype == torch.bfloat16 and kernel_device() == "cpu":
        # the interpreter mishandles bf16 memory; the kernel widens to float32 first, so giving
        # it the (exact) float32 copy computes the same bytes
        w = w.float()
    # our quantization without double quant: bytes and float32 absmax
    if impl == "reference":
        packed, raw = nf4.quantize_4bit_ref(w, bs, qt, False)
    else:
        with qkern.backend("triton"):
            packed, raw = nf4._quantize_4bit_triton(w, bs, qt, False, rcp_mode=nf4.RCP_IEEE)
    problems = [
        _explain_values(raw.absmax, t["absmax_raw"], "absmax"),
        _explain_packed(packed, t[PREFIX], w, raw.absmax, bs, qt),
    ]
    assert packed.shape == t[PREFIX].shape
    if dq:
        # double quant with bitsandbytes' offset (torch's CPU and CUDA means may differ in the
        # last bits, being summed in another order), then our own offset must be within a few
        # ulps (seen: 2 ulps for 136 blocks on an H200 against torch's CPU mean)
        codes, nested, _ = nf4.double_quant_ref(raw.absmax, offset=bnb_state.offset)
        problems += [
            _explain_codes(codes, bnb_state.absmax, "absmax codes"),
            _explain_values(nested, bnb_state.nested_absmax, "nested absmax"),
        ]
        own_offset = raw.absmax.mean().item()
        assert _ulps_apart(own_offset, bnb_state.offset) <= 4, (own_offset, bnb_state.offset)
        if own_offset == bnb_state.offset:  # then our whole pipeline must agree as well
            if impl == "reference":
                _, full = nf4.quantize_4bit_ref(w, bs, qt, True)
            else:
                with qkern.backend("triton"):
                    _, full = nf4._quantize_4bit_triton(w, bs, qt, True, rcp_mode=nf4.RCP_IEEE)
            problems.append(_explain_codes(full.absmax, bnb_state.absmax, "own-offset codes"))
    problems = [p for p in problems if p]
    assert not problems, f"{path.stem}: " + "; ".join(problems)


@pytest.mark.parametrize("path", _fixture_files(), ids=lambda p: p.stem)
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_fixture_dequantize_reproduces_bnb(path, impl):
    t, _ = _load(path)
    state = nf4.QuantState.from_bnb_dict(t, PREFIX)
    assert torch.equal(state.dequantized_absmax(), t["absmax_deq"]), _explain_values(
        state.dequantized_absmax(), t["absmax_deq"], "dequantized absmax"
    )
    want = t["dequant"]
    with qkern.backend(impl):
        if impl == "triton" and want.dtype == torch.bfloat16 and kernel_device() == "cpu":
            # interpreter: store float32 and round once on the host, the same single rounding of
            # the same float32 product that the kernel's bf16 store does on a GPU
            out = nf4.dequantize_4bit(t[PREFIX], state, dtype=torch.float32).to(torch.bfloat16)
        else:
            out = nf4.dequantize_4bit(t[PREFIX], state)
    assert out.dtype == want.dtype and out.shape == want.shape
    same = (out == want) | (out.isnan() & want.isnan())
    assert bool(same.all()), _explain_values(out, want, f"{path.stem} dequant")


@pytest.mark.parametrize("path", _fixture_files(), ids=lambda p: p.stem)
def test_fixture_state_round_trips_through_our_serializer(path):
    t, _ = _load(path)
    state = nf4.QuantState.from_bnb_dict(t, PREFIX)
    again = state.as_bnb_dict(PREFIX, packed=t[PREFIX])
    for k, v in again.items():
        if k.endswith(("bitsandbytes__nf4", "bitsandbytes__fp4")):
            continue  # same fields; the offset's decimal rendering may differ
        assert torch.equal(v, t[k]), k
    assert nf4.QuantState.from_bnb_dict(again, PREFIX).offset == state.offset


# ---- (b) live comparison on the GPU ----------------------------------------------------------

GPU_SHAPES = [((4096, 4096), 64), ((1023, 4097), 64), ((333, 777), 128), ((128, 64), 32)]


def _bnb():
    return pytest.importorskip("bitsandbytes.functional")


def _bnb_quantize(F, w, bs, qt, dq):
    try:
        return F.quantize_4bit(w, blocksize=bs, compress_statistics=dq, quant_type=qt)
    except Exception as e:  # a blocksize this bitsandbytes build lacks
        pytest.skip(f"bitsandbytes cannot quantize blocksize {bs}: {e}")


def _to_ours(packed, bnb_state) -> nf4.QuantState:
    d = {f"{PREFIX}.{k}": v for k, v in bnb_state.as_dict(packed=True).items()}
    return nf4.QuantState.from_bnb_dict(d, PREFIX).to(packed.device)


@pytest.mark.gpu
@pytest.mark.parametrize("dq", [True, False])
@pytest.mark.parametrize("qt", nf4.QUANT_TYPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape,bs", GPU_SHAPES)
def test_gpu_live_matches_bitsandbytes(shape, bs, dtype, qt, dq):
    F = _bnb()
    torch.manual_seed(0)
    w = (torch.randn(*shape, device="cuda") * 0.05).to(dtype)
    w.view(-1)[:: max(1, w.numel() // 97)] *= 30  # outliers
    pb, sb = _bnb_quantize(F, w, bs, qt, dq)
    po, so = qkern.quantize_4bit(w, blocksize=bs, quant_type=qt, compress_statistics=dq)
    raw = F.quantize_4bit(w, blocksize=bs, compress_statistics=False, quant_type=qt)[1].absmax
    problems = [_explain_packed(po, pb, w, raw, bs, qt)]
    if dq:
        problems += [
            _explain_codes(so.absmax, sb.absmax, "absmax codes"),
            _explain_values(so.nested_absmax, sb.state2.absmax, "nested absmax"),
        ]
        if so.offset != sb.offset.item():
            problems.append(f"offset {so.offset!r} vs bnb {sb.offset.item()!r}")
    else:
        problems.append(_explain_values(so.absmax, sb.absmax, "absmax"))
    # dequantize bitsandbytes' own state both ways
    want = F.dequantize_4bit(pb, sb, blocksize=bs, quant_type=qt)
    got = qkern.dequantize_4bit(pb, _to_ours(pb, sb))
    problems.append(_explain_values(got, want, "dequant"))
    problems = [p for p in problems if p]
    assert not problems, "; ".join(problems)


@pytest.mark.gpu
def test_gpu_reciprocal_modes_against_bitsandbytes():
    """Which 1/absmax reproduces bitsandbytes: counts differing 4-bit and 8-bit indices for each
    reciprocal mode; the module default must be one with zero differences."""
    F = _bnb()
    torch.manual_seed(1)
    w = (torch.randn(8192, 4096, device="cuda") * 0.02).to(torch.bfloat16)
    pb, sb = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    counts = {}
    for mode in (nf4.RCP_IEEE, nf4.RCP_APPROX, nf4.RCP_DIV_FULL):
        po, so = nf4._quantize_4bit_triton(w, 64, "nf4", True, rcp_mode=mode)
        counts[mode] = (
            int((po != pb).sum()),
            int((so.absmax != sb.absmax).sum()),
        )
    print(f"differing (bytes, absmax codes) per mode (0 ieee, 1 rcp.approx, 2 div.full): {counts}")
    assert counts[nf4.GPU_RCP_MODE] == (0, 0), counts


@pytest.mark.gpu
def test_gpu_bnb_quantize_then_our_dequant_into_buffer():
    F = _bnb()
    w = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16)
    pb, sb = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    out = torch.full_like(w, float("nan"))
    qkern.dequantize_4bit(pb, _to_ours(pb, sb), out=out)
    want = F.dequantize_4bit(pb, sb, blocksize=64, quant_type="nf4")
    assert torch.equal(out, want), _explain_values(out, want, "dequant into buffer")
