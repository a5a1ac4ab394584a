"""Optional native CUDA kernels, compiled at run time with NVRTC (no build step, no nvcc).

The sources live in the repository's ``csrc/`` directory. A kernel is compiled once per variant
(a set of ``-D`` macros) and device, loaded with the CUDA driver API and launched with
``cuLaunchKernel`` on the current stream (so it is captured by CUDA graphs like any other
launch). Everything goes through ctypes: the NVRTC library that ships with the CUDA build of
PyTorch and the driver's ``libcuda``.

Nothing here is required: :func:`available` is False on CPU-only builds, when the sources are
not next to the package (an installed wheel), when NVRTC cannot be loaded, or when
``QKERN_NATIVE=0``; callers then use their Triton kernels. Compilation errors raise (they are
bugs), while a missing library only makes the native path unavailable.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent.parent / "csrc"
_INVALID_CONTEXT = 201  # CUDA_ERROR_INVALID_CONTEXT


def _env_enabled() -> bool:
    return os.environ.get("QKERN_NATIVE", "1") != "0"


@functools.lru_cache(maxsize=1)
def _nvrtc() -> ctypes.CDLL | None:
    """The NVRTC library, or None when it cannot be loaded."""
    try:  # the loader PyTorch uses for its own run-time compiled kernels
        from torch.cuda._utils import _get_gpu_rtc_library

        return _get_gpu_rtc_library()
    except Exception:
        pass
    major = (torch.version.cuda or "12").split(".")[0]
    for name in (f"libnvrtc.so.{major}", "libnvrtc.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


@functools.lru_cache(maxsize=1)
def _libcuda() -> ctypes.CDLL:
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuLaunchKernel.argtypes = (
        [ctypes.c_void_p]
        + [ctypes.c_uint] * 6
        + [
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
    )
    return lib


def available(device: torch.device | str | None = None) -> bool:
    """Whether native kernels can run on ``device`` (a CUDA device of compute capability >= 8.0:
    the kernels use ``mma.sync`` on 16-bit operands)."""
    if not _env_enabled() or torch.version.cuda is None or not torch.cuda.is_available():
        return False
    device = torch.device(device) if device is not None else None
    if device is not None and device.type != "cuda":
        return False
    if not (CSRC / "nf4_small_m.cu").exists() or _nvrtc() is None:
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def _check(lib: ctypes.CDLL, result: int, what: str) -> None:
    if result != 0:
        msg = ctypes.c_char_p()
        getter = getattr(lib, "nvrtcGetErrorString", None)
        if getter is not None:
            getter.restype = ctypes.c_char_p
            text = getter(result)
        else:
            lib.cuGetErrorString(result, ctypes.byref(msg))
            text = msg.value
        raise RuntimeError(f"{what} failed ({result}): {text.decode() if text else 'unknown'}")


def compile_cubin(source: str, name: str, arch: str, defines: dict[str, int]) -> bytes:
    """Compile ``source`` (one ``extern "C"`` kernel ``name``) for ``arch`` (e.g. "sm_90") with
    ``defines`` into a CUBIN. Raises RuntimeError with NVRTC's log on a compile error."""
    lib = _nvrtc()
    if lib is None:
        raise RuntimeError("NVRTC could not be loaded")
    prog = ctypes.c_void_p()
    _check(
        lib,
        lib.nvrtcCreateProgram(
            ctypes.byref(prog), source.encode(), f"{name}.cu".encode(), 0, None, None
        ),
        "nvrtcCreateProgram",
    )
    try:
        opts = [f"--gpu-architecture={arch}", "-default-device", "--std=c++17"]
        opts += [f"-D{k}={int(v)}" for k, v in sorted(defines.items())]
        c_opts = (ctypes.c_char_p * len(opts))(*(o.encode() for o in opts))
        res = lib.nvrtcCompileProgram(prog, len(opts), c_opts)
        if res != 0:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            raise RuntimeError(f"NVRTC failed to compile {name} {defines}:\n{log.value.decode()}")
        size = ctypes.c_size_t()
        _check(lib, lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
        cubin = ctypes.create_string_buffer(size.value)
        _check(lib, lib.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        return cubin.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


class Kernel:
    """One loaded native kernel; ``launch`` takes prepared ctypes argument slots."""

    def __init__(self, cubin: bytes, name: str, device: int) -> None:
        self.device = device
        cuda = _libcuda()
        self._module = ctypes.c_void_p()
        _check(cuda, cuda.cuModuleLoadData(ctypes.byref(self._module), cubin), "cuModuleLoadData")
        self.func = ctypes.c_void_p()
        _check(
            cuda,
            cuda.cuModuleGetFunction(ctypes.byref(self.func), self._module, name.encode()),
            "cuModuleGetFunction",
        )

    def launch(self, grid: tuple[int, int], block: int, params, stream: int) -> None:
        """Launch on ``stream`` (a raw CUDA stream handle) with ``params``, a ctypes array of
        pointers to the argument values (see :class:`Args`)."""
        cuda = _libcuda()
        res = cuda.cuLaunchKernel(
            self.func, grid[0], grid[1], 1, block, 1, 1, 0, stream, params, None
        )
        if res == _INVALID_CONTEXT:  # a thread that never made the context current
            torch.cuda.synchronize(self.device)
            res = cuda.cuLaunchKernel(
                self.func, grid[0], grid[1], 1, block, 1, 1, 0, stream, params, None
            )
        if res != 0:
            _check(cuda, res, "cuLaunchKernel")


class Args:
    """Kernel argument slots kept between launches: ``set(i, value)`` rewrites slot i in place,
    so a launch costs no ctypes allocation. Types: "p" pointer, "i" int32, "d" double."""

    _CTYPES = {"p": ctypes.c_void_p, "i": ctypes.c_int, "d": ctypes.c_double}

    def __init__(self, kinds: str, values) -> None:
        self.slots = [self._CTYPES[k](v) for k, v in zip(kinds, values, strict=True)]
        self.params = (ctypes.c_void_p * len(self.slots))(
            *(ctypes.cast(ctypes.byref(s), ctypes.c_void_p) for s in self.slots)
        )

    def set(self, i: int, value) -> None:
        self.slots[i].value = value


_KERNELS: dict[tuple, Kernel] = {}

# held around filling an entry's argument slots and launching (see qkern.qlora._native_run)
LAUNCH_LOCK = threading.Lock()


def _key(file: str, name: str, defines: dict[str, int], device: torch.device) -> tuple:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return (file, name, tuple(sorted(defines.items())), index)


def loaded(file: str, name: str, defines: dict[str, int], device: torch.device) -> bool:
    """Whether :func:`kernel` has this variant loaded on ``device`` already."""
    return _key(file, name, defines, device) in _KERNELS


def kernel(file: str, name: str, defines: dict[str, int], device: torch.device) -> Kernel:
    """The kernel ``name`` of ``csrc/<file>`` for ``defines`` on ``device``, compiled and loaded
    on first use."""
    key = _key(file, name, defines, device)
    index = key[-1]
    k = _KERNELS.get(key)
    if k is None:
        major, minor = torch.cuda.get_device_capability(index)
        cubin = compile_cubin((CSRC / file).read_text(), name, f"sm_{major}{minor}", defines)
        # a runtime call that needs the device's primary context makes it current on this
        # thread (the driver-API module load needs one). Never called inside a CUDA-graph
        # capture: a module load there would invalidate it (see qkern.qlora._native_configure)
        torch.cuda.synchronize(index)
        with torch.cuda.device(index):
            k = _KERNELS[key] = Kernel(cubin, name, index)
    return k
