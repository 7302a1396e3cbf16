"""pytest configuration shared by every chapter's tests.

* ``import nanokimi`` first, so ``TRITON_INTERPRET=1`` is set (on a CPU machine) before any kernel module.
* ``@pytest.mark.gpu`` tests are skipped without CUDA; under ``NANOKIMI_REQUIRE_GPU=1`` (``make test-gpu``)
  a missing GPU is an error instead of a skip, so a GPU run cannot pass by skipping everything.
* Fixtures: ``device`` (where kernels run here) and ``dtype_grid`` (the float dtypes to test on it).
"""

from __future__ import annotations

import os

import pytest
import torch

import nanokimi  # noqa: F401  (sets TRITON_INTERPRET before kernel modules are imported)
from nanokimi.testing import kernel_device


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    if os.environ.get("NANOKIMI_REQUIRE_GPU") == "1":
        raise pytest.UsageError("NANOKIMI_REQUIRE_GPU=1 but torch.cuda.is_available() is False")
    skip = pytest.mark.skip(reason="needs a CUDA device (run `make test-gpu` on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    """Where Triton kernels run in this session: CPU (interpreter) or CUDA (compiled)."""
    return kernel_device()


@pytest.fixture(params=["float32", "bfloat16"])
def dtype_grid(request, device) -> torch.dtype:
    """fp32 everywhere; bf16 only where it is computed natively (on the GPU; the interpreter gives NaN)."""
    dtype = getattr(torch, request.param)
    if dtype is torch.bfloat16 and device.type != "cuda":
        pytest.skip("bf16 kernels are tested compiled on the GPU only (the interpreter has no bf16 math)")
    return dtype


@pytest.fixture
def one_thread():
    """One intra-op thread for the test, restored afterwards: tiny models run fastest that way on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
