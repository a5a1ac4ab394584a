#!/usr/bin/env python3
"""Set up the project's environment and run the demo or the tests, on a machine with only Python.

    python3 quickstart.py demo    # train a tiny Llama + QLoRA on generated data, end to end
    python3 quickstart.py test    # lint, format check and the whole test suite

The first run creates ``.venv`` beside this file and installs the package with its test extras
(PyTorch comes from ``torch==2.13.0``); later runs reuse it unless ``pyproject.toml`` changed.
Extra arguments go to the demo or to pytest.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PY = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
STAMP = VENV / ".qkern-installed"
TORCH = "torch==2.13.0"
PARITY = ["transformers==5.17.0", "peft==0.21.0"]


def run(cmd: list[str], **kw) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, **kw)


def ensure_env(with_tests: bool) -> None:
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists():
        stamp_digest, _, stamp_extras = STAMP.read_text().strip().partition("+")
        if stamp_digest == digest and (stamp_extras == "test" or not with_tests):
            return
    if not PY.exists():
        print(f"creating virtual environment in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    pip = [str(PY), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    # torch first and pinned, so nothing later pulls a different build
    run([*pip, TORCH])
    extras = "[test]" if with_tests else ""
    run([*pip, "-e", f".{extras}"])
    if with_tests:
        run([*pip, *PARITY])
    STAMP.write_text(digest + ("+test" if with_tests else ""))


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test"):
        print(__doc__)
        return 2
    job, rest = argv[0], argv[1:]
    ensure_env(with_tests=job == "test")
    env = dict(os.environ)
    if job == "demo":
        return subprocess.run(
            [str(PY), "-m", "qkern_train.demo", *rest], cwd=ROOT, env=env
        ).returncode
    run([str(PY), "-m", "ruff", "check", "."])
    run([str(PY), "-m", "ruff", "format", "--check", "."])
    return subprocess.run([str(PY), "-m", "pytest", "-q", *rest], cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
