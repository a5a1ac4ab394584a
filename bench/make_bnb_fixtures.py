"""Write small bitsandbytes NF4/FP4 fixtures that the CPU test suite checks qkern.nf4 against.

Run on a CUDA machine with bitsandbytes installed:

    python3 bench/make_bnb_fixtures.py tests/fixtures/nf4

One safetensors file per case, holding (all on CPU):

* ``input``       — the seeded weight, in its dtype
* ``w.weight``    — bitsandbytes' packed uint8 bytes, and its quant state under the checkpoint keys
  ``w.weight.absmax``, ``.quant_map``, ``.nested_absmax``, ``.nested_quant_map``,
  ``.quant_state.bitsandbytes__<type>`` (``QuantState.as_dict(packed=True)``)
* ``absmax_raw``  — float32 absmax from the same quantization without double quant
* ``absmax_deq``  — the absmax bitsandbytes dequantizes from the double-quantized state
* ``dequant``     — ``bitsandbytes.functional.dequantize_4bit`` of the packed weight
* ``dynamic_map`` — ``bitsandbytes.functional.create_dynamic_map()``

plus string metadata (case parameters, library versions, card). Cases cover every dtype, both
quant types, both double-quant settings, blocksizes 32..4096, odd element counts, more than 256
blocks (several nested blocks), an all-zero block, and blocks whose scaled values sit exactly on
the decision thresholds (both float32 neighbours of each real midpoint). Total size < 1 MB.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch


def _threshold_neighbours(quant_type: str) -> list[float]:
    """For every decision threshold t (exact real midpoint between two code values): the float32
    values just below/at/above it, so a block with absmax 1.0 puts scaled values exactly there."""
    if quant_type == "nf4":
        code = torch.tensor(
            [
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
            ],
            dtype=torch.float64,
        )
        mids = (code[:-1] + code[1:]) / 2
    else:
        # bitsandbytes' FP4 thresholds on |x| (decimal literals of its CUDA source), both signs
        lits = [0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333]
        mids = torch.tensor(lits + [-v for v in lits], dtype=torch.float64)
    vals = []
    for m in mids.tolist():
        f = torch.tensor(m, dtype=torch.float32)
        for c in (
            torch.nextafter(f, torch.tensor(-math.inf)),
            f,
            torch.nextafter(f, torch.tensor(math.inf)),
        ):
            vals.append(c.item())
    return vals


def _cases() -> list[dict]:
    g = torch.Generator().manual_seed(1234)

    def randn(*shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
        x = torch.randn(*shape, generator=g, dtype=torch.float32) * scale
        # a few outliers per tensor, as real weights have
        flat = x.view(-1)
        idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 500),), generator=g)
        flat[idx] *= 20.0
        return x.to(dtype)

    cases = [
        dict(name="nf4_dq_bs64_bf16_64x64", w=randn(64, 64, dtype=torch.bfloat16), bs=64),
        dict(
            name="fp4_nodq_bs128_fp16_33x70",
            w=randn(33, 70, dtype=torch.float16),
            bs=128,
            qt="fp4",
            dq=False,
        ),
        dict(name="nf4_dq_bs32_fp32_17x256", w=randn(17, 256, dtype=torch.float32), bs=32),
        dict(name="fp4_dq_bs64_fp32_odd_1001", w=randn(1001, dtype=torch.float32), bs=64, qt="fp4"),
        dict(
            name="nf4_dq_bs32_fp16_300x64_nested3",
            w=randn(300, 64, dtype=torch.float16, scale=0.02),
            bs=32,
        ),
        dict(
            name="nf4_nodq_bs256_bf16_9x300",
            w=randn(9, 300, dtype=torch.bfloat16),
            bs=256,
            dq=False,
        ),
        dict(
            name="fp4_dq_bs512_bf16_5x333", w=randn(5, 333, dtype=torch.bfloat16), bs=512, qt="fp4"
        ),
        dict(name="nf4_dq_bs1024_fp32_3x1111", w=randn(3, 1111, dtype=torch.float32), bs=1024),
        dict(name="nf4_dq_bs2048_fp16_4x2049", w=randn(4, 2049, dtype=torch.float16), bs=2048),
        dict(name="nf4_dq_bs4096_bf16_3x4097", w=randn(3, 4097, dtype=torch.bfloat16), bs=4096),
    ]
    # an all-zero block and two half-zero blocks among normal ones
    z = randn(6, 64, dtype=torch.bfloat16)
    z[2] = 0
    z[4, 32:] = 0
    z[5, :32] = 0
    cases.append(dict(name="nf4_dq_bs64_bf16_zero_block", w=z.clone(), bs=64))
    cases.append(dict(name="fp4_nodq_bs64_bf16_zero_block", w=z.clone(), bs=64, qt="fp4", dq=False))
    # exact thresholds: each block holds 1.0 (so absmax = 1 and 1/absmax = 1 exactly) and scaled
    # values on and next to every threshold
    for qt in ("nf4", "fp4"):
        vals = _threshold_neighbours(qt)
        rows = []
        for k in range(0, len(vals), 63):
            chunk = vals[k : k + 63]
            chunk = chunk + [0.0] * (63 - len(chunk)) + [1.0]
            rows.append(chunk)
        w = torch.tensor(rows, dtype=torch.float32)
        for dq in (True, False):
            cases.append(
                dict(
                    name=f"{qt}_{'dq' if dq else 'nodq'}_bs64_fp32_thresholds",
                    w=w,
                    bs=64,
                    qt=qt,
                    dq=dq,
                )
            )
    for c in cases:
        c.setdefault("qt", "nf4")
        c.setdefault("dq", True)
    return cases


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("outdir", type=Path)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 2
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    from safetensors.torch import save_file

    args.outdir.mkdir(parents=True, exist_ok=True)
    meta_common = {
        "bitsandbytes": bnb.__version__,
        "torch": torch.__version__,
        "card": torch.cuda.get_device_name(0),
    }
    dmap = F.create_dynamic_map().float().cpu().contiguous()
    total = 0
    for case in _cases():
        w = case["w"].cuda()
        bs, qt, dq = case["bs"], case["qt"], case["dq"]
        try:
            packed, state = F.quantize_4bit(w, blocksize=bs, compress_statistics=dq, quant_type=qt)
            _, raw_state = F.quantize_4bit(
                w, blocksize=bs, compress_statistics=False, quant_type=qt
            )
        except Exception as e:  # e.g. a blocksize this bitsandbytes build lacks
            print(f"skip {case['name']}: {type(e).__name__}: {e}")
            continue
        deq = F.dequantize_4bit(packed, state, blocksize=bs, quant_type=qt)
        if dq:
            absmax_deq = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
        else:
            absmax_deq = state.absmax
        tensors = {
            "input": case["w"].contiguous(),
            "w.weight": packed.cpu().contiguous(),
            "absmax_raw": raw_state.absmax.float().cpu().contiguous(),
            "absmax_deq": absmax_deq.float().cpu().clone(),
            "dequant": deq.cpu().contiguous(),
            "dynamic_map": dmap,
        }
        for k, v in state.as_dict(packed=True).items():
            tensors[f"w.weight.{k}"] = v.cpu().contiguous()
        meta = dict(
            meta_common,
            case=case["name"],
            blocksize=str(bs),
            quant_type=qt,
            double_quant=str(dq),
            dtype=str(w.dtype).replace("torch.", ""),
        )
        path = args.outdir / f"{case['name']}.safetensors"
        save_file(tensors, str(path), metadata=meta)
        total += path.stat().st_size
        print(f"wrote {path} ({path.stat().st_size} B)")
    print(f"total {total} B")
    return 0 if total < 1_000_000 else 1


if __name__ == "__main__":
    sys.exit(main())
