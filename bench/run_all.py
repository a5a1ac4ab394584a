"""Run the whole benchmark suite on one CUDA device and write one JSON file plus a table.

    PYTHONPATH=. python3 bench/run_all.py [--only nf4,attention] [--out DIR]

Each ``bench/bench_<name>.py`` module exposes ``run(ceilings) -> list[Row]``; they run in one
process after the ceilings (copy bandwidth, bf16 matmul) are measured, so every ratio in the table
is against baselines and ceilings of the same card in the same run. A module that fails is
reported and the rest still run.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Row, environment, format_table, measure_ceilings, write_results  # noqa: E402

SUITE = [
    "nf4",
    "qlora",
    "elementwise",
    "attention",
    "cross_entropy",
    "optim8bit",
    "generate",
    "load",
    "e2e",
]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="", help="comma-separated names from " + ",".join(SUITE))
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n] or SUITE
    if not torch.cuda.is_available():
        print("the benchmark suite needs a CUDA device")
        return 2
    env = environment()
    ceilings = measure_ceilings()
    print(
        f"{env.get('card')}: copy {ceilings.copy_gbs:.0f} GB/s, bf16 matmul "
        f"{ceilings.matmul_tflops:.0f} TFLOP/s",
        flush=True,
    )
    rows: list[Row] = []
    failures = {}
    for name in names:
        t0 = time.time()
        try:
            module = importlib.import_module(f"bench.bench_{name}")
            new = module.run(ceilings)
            rows.extend(new)
            print(format_table(new, ceilings), flush=True)
        except Exception:
            failures[name] = traceback.format_exc()
            print(f"[{name}] FAILED\n{failures[name]}", flush=True)
        print(f"[{name}] {time.time() - t0:.1f} s", flush=True)
        torch.cuda.empty_cache()
    env["failures"] = failures
    card = str(env.get("card", "gpu")).replace(" ", "_")
    out = Path(args.out) / f"suite-{card}-{time.strftime('%Y%m%d-%H%M')}.json"
    write_results(out, rows, ceilings, env)
    print(f"wrote {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
