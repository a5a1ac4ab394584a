"""Streaming NF4 load: peak host and GPU memory of ``load_model(..., load_in_4bit=True)``.

Writes a random Llama-3.2-1B-shaped checkpoint (1.236e9 parameters, tied embeddings, bf16,
sharded safetensors of at most 1 GiB) to a temporary directory, then loads it in a fresh
process (so ``ru_maxrss`` covers the load alone) with NF4 on the fly and, for comparison, in
bf16 and with transformers + bitsandbytes when both are importable.

Expected (see docs/model.md for the arithmetic):
  16-bit model: 2.47 GB. NF4 footprint on the GPU: embedding 0.525 GB (bf16; also the LM head)
  + projections 0.973e9 · 0.5156 B = 0.502 GB + norms -> ~1.03 GB; peak allocated adds one bf16
  projection in flight plus quantization scratch (largest: 8192 x 2048 bf16 = 33.6 MB).
  Host: the process baseline (CUDA context, torch) plus about one tensor in flight — the
  largest is the embedding, 0.525 GB — not the 2.47 GB model.
The floor here is not time but memory; the load time is reported in ``ms`` (reading 2.47 GB
from the page cache and quantizing on the GPU).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench.common import Ceilings, Row

SHAPE = dict(
    architecture="llama",
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    tie_word_embeddings=True,
    eos_token_id=[128001],
    torch_dtype="bfloat16",
)
ROOT = Path(__file__).resolve().parent.parent


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _rss_anon_mb() -> float:
    """Anonymous resident memory (RssAnon): the process's own copies, without the pages of
    memory-mapped files, which RSS also counts and the kernel can drop at any time."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024  # kB
    return float("nan")


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def write_checkpoint(directory: Path) -> int:
    """A random bf16 checkpoint of SHAPE; returns its parameter count. Tensors are made on the
    GPU one at a time and written in shards of 1 GiB, so the host holds at most one shard."""
    from qkern_train.checkpoint import to_hf_name, write_safetensors
    from qkern_train.model import ModelConfig, Transformer

    cfg = ModelConfig(**SHAPE)
    with torch.device("meta"):
        shapes = {to_hf_name(n): tuple(p.shape) for n, p in Transformer(cfg).named_parameters()}
    g = torch.Generator(device="cuda").manual_seed(0)

    def tensors():
        for name, shape in shapes.items():
            if "norm" in name:
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                t = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
            yield name, t.cpu()

    write_safetensors(tensors(), directory, max_shard_size=2**30)
    (directory / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
    return sum(int(torch.tensor(s).prod()) for s in shapes.values())


def _footprint(model) -> dict:
    """Bytes the loaded model holds on the GPU, by kind."""
    packed = state = dense = 0
    for m in model.modules():
        st = getattr(m, "quant_state", None)
        if st is not None:
            packed += m.packed.numel()
            state += st.absmax.numel() * st.absmax.element_size() + st.code.numel() * 4
            if st.nested_absmax is not None:
                state += st.nested_absmax.numel() * 4 + st.nested_code.numel() * 4
        for p in m.parameters(recurse=False):
            dense += p.numel() * p.element_size()
    return {"nf4_bytes": packed, "quant_state_bytes": state, "dense_bytes": dense}


class _RssSampler:
    """Peak resident set size during a block, sampled every 2 ms by a thread (ru_maxrss cannot
    be reset, and the process may have peaked higher before the block, e.g. while importing)."""

    def __enter__(self) -> _RssSampler:
        import threading

        self.peak = _rss_now_mb()
        self.peak_anon = _rss_anon_mb()
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(0.002):
                self.peak = max(self.peak, _rss_now_mb())
                self.peak_anon = max(self.peak_anon, _rss_anon_mb())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_now_mb())
        self.peak_anon = max(self.peak_anon, _rss_anon_mb())


def child(directory: str, mode: str) -> None:
    """Run in a fresh process: load once and print one JSON line of measurements."""
    import time

    torch.cuda.init()
    torch.zeros(1, device="cuda")  # CUDA context up before the baseline is taken
    import qkern_train.checkpoint  # noqa: F401  (imports counted in the baseline)

    base_max, base_now, base_anon = _maxrss_mb(), _rss_now_mb(), _rss_anon_mb()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    sampler = _RssSampler().__enter__()
    if mode == "hf-bnb":
        import transformers

        q = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )  # fmt: skip
        model = transformers.AutoModelForCausalLM.from_pretrained(
            directory, quantization_config=q, dtype=torch.bfloat16, device_map="cuda"
        )
        fp = {"model_bytes": model.get_memory_footprint()}
    else:
        from qkern_train.checkpoint import load_model

        model = load_model(directory, load_in_4bit=(mode == "nf4"), dtype=torch.bfloat16,
                           device="cuda")  # fmt: skip
        fp = _footprint(model)
        fp["model_bytes"] = fp["nf4_bytes"] + fp["quant_state_bytes"] + fp["dense_bytes"]
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    sampler.__exit__(None, None, None)
    out = {
        "seconds": seconds,
        "host_baseline_mb": base_now,
        "host_peak_during_load_mb": sampler.peak,
        "host_peak_over_baseline_mb": sampler.peak - base_now,
        "host_anon_peak_over_baseline_mb": sampler.peak_anon - base_anon,
        "host_maxrss_before_mb": base_max,
        "host_maxrss_after_mb": _maxrss_mb(),
        "host_after_mb": _rss_now_mb(),
        "gpu_peak_alloc_mb": torch.cuda.max_memory_allocated() / 2**20,
        "gpu_alloc_after_mb": torch.cuda.memory_allocated() / 2**20,
        **{k: v / 2**20 for k, v in fp.items()},
    }
    print("RESULT " + json.dumps(out), flush=True)


def _measure(directory: Path, mode: str) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    code = f"from bench.bench_load import child; child({str(directory)!r}, {mode!r})"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
        timeout=300,
    )  # fmt: skip
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"load child ({mode}) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def run(ceilings: Ceilings | None = None) -> list[Row]:
    tmp = Path(tempfile.mkdtemp(prefix="qkern-load-"))
    try:
        n_params = write_checkpoint(tmp)
        torch.cuda.empty_cache()
        bytes16 = 2 * n_params
        largest = SHAPE["vocab_size"] * SHAPE["hidden_size"] * 2
        case = f"llama {n_params / 1e9:.3f}B bf16 sharded"
        rows = []
        modes = ["nf4", "bf16"]
        try:
            import bitsandbytes  # noqa: F401
            import transformers  # noqa: F401

            modes.append("hf-bnb")
        except Exception:  # baseline not installed here
            pass
        for mode in modes:
            r = _measure(tmp, mode)
            extra = {
                **{k: round(v, 1) for k, v in r.items() if k != "seconds"},
                "model_16bit_mb": round(bytes16 / 2**20, 1),
                "largest_tensor_mb": round(largest / 2**20, 1),
            }
            provider = "transformers+bnb" if mode == "hf-bnb" else "qkern"
            rows.append(Row("load", f"{case} -> {mode}", provider, r["seconds"] * 1e3,
                            bytes=bytes16, extra=extra))  # fmt: skip
        return rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    from bench.common import format_table

    print(format_table(run(None), None))
