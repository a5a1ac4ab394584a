"""Run the whole benchmark suite on one CUDA device and write one JSON file plus a table.

    PYTHONPATH=. python3 bench/run_all.py [--only nf4,attention] [--out DIR]

Each ``bench/bench_<name>.py`` module exposes ``run(ceilings) -> list[Row]``. The ceilings (copy
bandwidth, bf16 matmul) are measured once, then each module runs in its own process on the same
card, so every ratio in the table is against baselines and ceilings of the same run, and a module
that fails (or leaves the CUDA context broken) is reported while the rest still run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    Ceilings,
    Row,
    environment,
    format_table,
    measure_ceilings,
    write_results,
)

SUITE = [
    "nf4",
    "qlora",
    "elementwise",
    "attention",
    "cross_entropy",
    "optim8bit",
    "generate",
    "load",
    "sft",
    "e2e",
]


def run_module(name: str, ceilings: Ceilings) -> list[Row]:
    """One benchmark module in this process (the child side of :func:`main`)."""
    module = importlib.import_module(f"bench.bench_{name}")
    return module.run(ceilings)


def _in_subprocess(name: str, ceilings: Ceilings, timeout_s: float) -> list[Row]:
    """Run one module in a fresh process and read its rows back.

    Isolation matters: a module that leaves the CUDA context in a bad state (seen: a failed
    CUDA-graph capture left the RNG "in capture" and every later module's torch.randn raised)
    must not take the rest of the suite with it.
    """
    with tempfile.TemporaryDirectory() as tmp:
        rows_path = Path(tmp) / "rows.json"
        cmd = [
            sys.executable, "-m", "bench.run_all", "--child", name,
            "--ceilings", json.dumps(asdict(ceilings)), "--rows", str(rows_path),
        ]  # fmt: skip
        proc = subprocess.run(cmd, cwd=ROOT, timeout=timeout_s)
        if proc.returncode != 0 or not rows_path.exists():
            raise RuntimeError(f"bench_{name} exited with status {proc.returncode}")
        return [Row(**r) for r in json.loads(rows_path.read_text())]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="", help="comma-separated names from " + ",".join(SUITE))
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per module")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ceilings", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rows", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        rows = run_module(args.child, Ceilings(**json.loads(args.ceilings)))
        Path(args.rows).write_text(json.dumps([asdict(r) for r in rows]))
        return 0
    if not torch.cuda.is_available():
        print("the benchmark suite needs a CUDA device")
        return 2
    names = [n for n in args.only.split(",") if n] or SUITE
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
            new = _in_subprocess(name, ceilings, args.timeout)
            rows.extend(new)
            print(format_table(new, ceilings), flush=True)
        except Exception:
            failures[name] = traceback.format_exc()
            print(f"[{name}] FAILED\n{failures[name]}", flush=True)
        print(f"[{name}] {time.time() - t0:.1f} s", flush=True)
    env["failures"] = failures
    card = str(env.get("card", "gpu")).replace(" ", "_")
    out = Path(args.out) / f"suite-{card}-{time.strftime('%Y%m%d-%H%M')}.json"
    write_results(out, rows, ceilings, env)
    print(f"wrote {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
