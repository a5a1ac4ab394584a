import pytest
import torch

import qkern
from qkern import _backend


def test_backend_context_restores_mode():
    assert qkern.get_backend() == "auto"
    with qkern.backend("reference"):
        assert qkern.get_backend() == "reference"
        assert not _backend.use_triton(torch.zeros(1))
    assert qkern.get_backend() == "auto"


def test_bad_backend_mode_is_a_value_error():
    with pytest.raises(ValueError, match="backend mode must be one of"):
        qkern.set_backend("cuda")


def test_auto_mode_uses_reference_on_cpu():
    assert not _backend.use_triton(torch.ones(2), None)


def test_forced_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with qkern.backend("triton"), pytest.raises(RuntimeError, match="Triton interpreter"):
        _backend.use_triton(torch.ones(2))


def test_check_float_names_the_tensor():
    with pytest.raises(TypeError, match="weight must have dtype"):
        _backend.check_float(torch.ones(2, dtype=torch.int32), "weight")


def test_unknown_export_is_attribute_error():
    with pytest.raises(AttributeError, match="nope"):
        qkern.nope  # noqa: B018
