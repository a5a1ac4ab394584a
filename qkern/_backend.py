"""Device dispatch shared by every qkern op.

Each op in qkern has two implementations that compute the same function:

* ``<op>_ref`` — plain PyTorch, written for clarity. It is the CPU execution path and the oracle
  the tests compare against.
* a Triton kernel — used for CUDA tensors, and, for testing, on CPU tensors through the Triton
  interpreter (``TRITON_INTERPRET=1`` set before ``triton`` is first imported).

The public function of an op asks :func:`use_triton` which one to run. The choice is global and
can be forced, for tests or for users who want the reference everywhere::

    with qkern.backend("reference"):   # or "triton", or "auto" (the default)
        y = qkern.rms_norm(x, w)

The environment variable ``QKERN_BACKEND`` sets the initial mode; it is read here and nowhere else.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

_MODES = ("auto", "triton", "reference")
_mode = os.environ.get("QKERN_BACKEND", "auto")
if _mode not in _MODES:
    raise ValueError(f"QKERN_BACKEND={_mode!r} is not one of {_MODES}")


def get_backend() -> str:
    """The current dispatch mode: ``"auto"``, ``"triton"`` or ``"reference"``."""
    return _mode


def set_backend(mode: str) -> None:
    """Set the dispatch mode for every op (see the module docstring)."""
    global _mode
    if mode not in _MODES:
        raise ValueError(f"backend mode must be one of {_MODES}, got {mode!r}")
    _mode = mode


@contextlib.contextmanager
def backend(mode: str) -> Iterator[None]:
    """Run the enclosed code with dispatch mode ``mode``, restoring the previous one after."""
    previous = get_backend()
    set_backend(mode)
    try:
        yield
    finally:
        set_backend(previous)


def interpreter_enabled() -> bool:
    """True when Triton kernels run on the CPU through the Triton interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """Whether an op given ``tensors`` should run its Triton kernel (else its reference).

    ``auto``: Triton when every tensor is on a CUDA device. ``reference``: never.
    ``triton``: always; CPU tensors then need the interpreter, and asking for it without the
    interpreter is an error rather than a silent fallback.
    """
    present = [t for t in tensors if t is not None]
    on_cuda = bool(present) and all(t.is_cuda for t in present)
    if _mode == "reference":
        return False
    if _mode == "auto":
        return on_cuda
    if on_cuda or interpreter_enabled():
        return True
    raise RuntimeError(
        "qkern backend 'triton' was forced on CPU tensors, which needs the Triton interpreter: "
        "set TRITON_INTERPRET=1 before triton is imported, or use backend 'auto'/'reference'"
    )


def pick_configs(configs: list) -> list:
    """Autotuning candidates: all of them on a GPU, the first one under the interpreter.

    The interpreter cannot time kernels (no CUDA events), and on the CPU only correctness matters.
    """
    return configs[:1] if interpreter_enabled() else configs


def num_sms(device: torch.device | str | int | None = None) -> int:
    """Streaming multiprocessors of a CUDA device (a fixed 4 under the interpreter)."""
    if not torch.cuda.is_available():
        return 4
    return torch.cuda.get_device_properties(
        device or torch.cuda.current_device()
    ).multi_processor_count


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_float(t: torch.Tensor, name: str, dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES) -> None:
    """Raise a TypeError naming ``name`` unless ``t`` is a tensor of one of ``dtypes``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(
            f"{name} must have dtype in ({allowed}), got {str(t.dtype).replace('torch.', '')}"
        )


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """Raise a ValueError naming the tensors when they are not all on one device."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"tensors must be on one device: {listing}")
