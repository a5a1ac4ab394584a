"""Small-M NF4 matmul under three L2 states, next to the floors that bound it.

For 4096x4096 and 14336x4096 (N x K) and M = 1, 2, 8, 16 rows of bf16 x, times every
``nf4_matmul`` candidate (forced, see ``qkern.qlora._NF4_MM_CONFIGS``), bitsandbytes'
``matmul_4bit`` (when installed) and the bf16 matmul ``x @ W.T``, plus three floors: an empty
Triton kernel (launch + event overhead), a Triton kernel that only reads the packed NF4 bytes
(16-byte loads, XOR-reduced), and a device copy of those bytes. Each call is timed (GPU µs,
median of 30, every call queued behind a sleep so no host time is timed) after one of:

    dirty  zero-filling a 256 MB buffer: what triton's do_bench does between runs; the dirty
           lines it leaves in L2 are written back while the timed kernel runs
    clean  reading a 256 MB buffer: L2 holds clean lines, nothing to write back
    warm   nothing: what the previous call of the same op left in L2 (the NF4 weight fits)

Comparing the three tells a memory-bound kernel (slower when dirty) from an issue- or
latency-bound one (about the same in all three).

    PYTHONPATH=. python3 bench/profile_small_m.py [--json OUT.json]
    ncu --clock-control none --section SpeedOfLight --section WarpStateStats ... \\
        python3 bench/profile_small_m.py --once --shape 14336x4096 --ms 1,8

``--once`` runs each op a single time (after building it) instead of timing it, for a
profiler; ``--shape`` and ``--ms`` narrow the cases.
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl

import qkern.qlora as ql
from bench.bench_qlora import _config_name, small_m_candidates
from bench.common import gpu_us
from qkern.nf4 import dequantize_4bit, quantize_4bit


@triton.jit
def _read_kernel(p, out, n_words, BLOCK: tl.constexpr, UNROLL: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    base = pid.to(tl.int64) * BLOCK * UNROLL
    for u in tl.static_range(UNROLL):
        offs = base + u * BLOCK + tl.arange(0, BLOCK)
        acc ^= tl.load(p + offs, mask=offs < n_words, other=0)
    tl.store(out + pid, tl.xor_sum(acc, 0))


@triton.jit
def _empty_kernel(out):
    pass


def _read_op(buf: torch.Tensor, block: int = 1024, unroll: int = 4):
    words = buf.reshape(-1).view(torch.int32)
    n = words.numel()
    grid = (triton.cdiv(n, block * unroll),)
    out = torch.empty(grid[0], dtype=torch.int32, device=buf.device)
    return lambda: _read_kernel[grid](words, out, n, BLOCK=block, UNROLL=unroll, num_warps=4)


def _ops(n: int, k: int, ms: list[int]) -> dict:
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    except Exception:  # not installed here
        bnb = None
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    packed, state = quantize_4bit(w)
    wd = dequantize_4bit(packed, state, dtype=torch.bfloat16)
    copy_out = torch.empty_like(packed)
    scratch = torch.empty(1, device="cuda")
    ops = {
        "read NF4 bytes": _read_op(packed),
        "read bf16 weight": _read_op(wd),
        "copy NF4 bytes": lambda: copy_out.copy_(packed),
        "empty kernel": lambda: _empty_kernel[(1,)](scratch),
    }
    if bnb is not None:
        bw, bs = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ops[f"M={m} bf16 x@W.T"] = lambda x=x: x @ wd.t()
        if bnb is not None:
            ops[f"M={m} bitsandbytes"] = lambda x=x: bnb.matmul_4bit(x, bw.t(), quant_state=bs)
        try:
            for cfg in small_m_candidates(m, k, state):
                ql.NF4_MATMUL_CONFIG = cfg
                ql._MM_CACHE.clear()  # a new launch entry with the forced configuration
                e = ql._mm_lookup(x, packed, state, None)
                ops[f"M={m} qkern {_config_name(cfg)}"] = lambda e=e, x=x: ql._mm_run(
                    e, x, packed, None, None
                )
        finally:
            ql.NF4_MATMUL_CONFIG = None
            ql._MM_CACHE.clear()
    return ops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--once", action="store_true", help="run each op once (for a profiler)")
    ap.add_argument("--shape", action="append", help="NxK, repeatable (default both)")
    ap.add_argument("--ms", default="1,2,8,16", help="comma-separated M values")
    a = ap.parse_args()
    torch.manual_seed(0)
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shape or ["4096x4096", "14336x4096"]]
    ms = [int(v) for v in a.ms.split(",")]
    rows = []
    with torch.no_grad():
        for n, k in shapes:
            for name, fn in _ops(n, k, ms).items():
                if a.once:
                    fn()
                    torch.cuda.synchronize()
                    print(f"{n}x{k} {name}", flush=True)  # the profiler's kernel order
                    continue
                row = {"shape": f"{n}x{k}", "op": name}
                row.update(
                    {mode: round(gpu_us(fn, flush=mode), 2) for mode in ("dirty", "clean", "warm")}
                )
                rows.append(row)
                print(json.dumps(row), flush=True)
    if a.json:
        env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "triton": triton.__version__}  # fmt: skip
        with open(a.json, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
