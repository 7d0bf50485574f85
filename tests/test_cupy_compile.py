"""Every CUDA kernel module of the cupy backend compiles for sm_80 and sm_90 without a GPU, with no register
spill, no local memory and exactly the entry points the backend launches (backends/cupy_kernels.py).

nvcc is the compiler CI has; NVRTC (what the backend compiles with at run time) is checked too where CuPy and
libnvrtc are installed. The same check from the command line: `python -m refllama.backends.cupy_kernels`.
"""

from __future__ import annotations

import os

import pytest

from refllama.backends import cupy_kernels as ck


def _nvrtc_available() -> bool:
    try:
        ck.nvrtc_version()
    except Exception:  # CuPy not installed, or no libnvrtc
        return False
    return True


@pytest.fixture(scope="module", params=["nvcc", "nvrtc"])
def compiled(request):
    """(results by (module, arch), problems) for one compiler, all modules compiled in parallel."""
    if request.param == "nvcc" and ck.find_nvcc() is None:
        if os.environ.get("CI"):
            pytest.fail("nvcc not found: CI must compile the CUDA kernels")
        pytest.skip("nvcc not found")
    if request.param == "nvrtc" and not _nvrtc_available():
        pytest.skip("NVRTC not available (CuPy with libnvrtc)")
    results, problems = ck.check_all(request.param, ck.CI_ARCHS)
    return {(r.module, r.arch): r for r in results}, problems


@pytest.mark.parametrize("arch", ck.CI_ARCHS)
@pytest.mark.parametrize("module", sorted(ck.MODULES))
def test_module_compiles_cleanly(compiled, module, arch):
    results, problems = compiled
    mine = [p for p in problems if p.startswith(f"{module} sm_{arch} ") or f"{module}.cu for sm_{arch}" in p]
    assert not mine, "\n".join(mine)
    result = results[module, arch]
    assert set(result.kernels) == set(ck.MODULES[module])
    assert result.binary  # a cubin came out
