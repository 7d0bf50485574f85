"""Loading is lazy and memory-mapped: peak RSS grows by about what is converted, never by the file twice."""

from __future__ import annotations

import json
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import FIXTURES, ROOT, smollm2_path

sys.path.insert(0, str(ROOT / "tools"))
from make_fixtures import _BASE, make_weights

CONFIG = {**_BASE, "vocab_size": 8192, "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 4,
          "num_attention_heads": 8, "num_key_value_heads": 4}

# The engine, its backend and ml_dtypes are imported before the baseline (refllama imports them lazily): the
# figure is what loading the weights costs, not what importing the code costs.
MEASURE = """
import sys, ml_dtypes, refllama, refllama.engine, refllama.formats.tokenizer, refllama.backends.numpy_backend
def peak_mb():
    return int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) / 1024
before = peak_mb()
engine = refllama.load(sys.argv[1])
print(peak_mb() - before)
"""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    weights = make_weights(CONFIG, seed=0)
    out = {}
    for name, dtype in [("bf16", ml_dtypes.bfloat16), ("f32", np.float32)]:
        folder = tmp_path_factory.mktemp(name)
        (folder / "config.json").write_text(json.dumps(CONFIG))
        tensors = {k: v.astype(dtype) for k, v in weights.items()}
        save_file(tensors, str(folder / "model.safetensors"))
        out[name] = (folder, sum(t.size for t in tensors.values()) * 4 / 2**20)  # MiB as float32
    return out


def _load_peak_mib(folder) -> float:
    result = subprocess.run([sys.executable, "-c", MEASURE, str(folder)], capture_output=True, text=True,
                            check=True, timeout=120)
    return float(result.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc (Linux only)")
def test_bf16_to_float32_load_peaks_near_the_converted_size(checkpoints):
    folder, f32_mib = checkpoints["bf16"]
    growth = _load_peak_mib(folder)
    # measured 90 MiB for 84 MiB converted: the largest tensor's source pages are resident while it converts
    assert 0.9 * f32_mib < growth < 1.15 * f32_mib


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc (Linux only)")
def test_float32_checkpoint_loads_without_copying(checkpoints):
    folder, f32_mib = checkpoints["f32"]
    assert _load_peak_mib(folder) < 0.05 * f32_mib  # measured 0.1 MiB for 84 MiB of weights


def test_numba_estimate_counts_what_it_reads_in_place():
    """The numba backend keeps bfloat16 matrices and its GGUF block types as stored: the estimate counts their
    stored bytes (bfloat16 vectors become float32), while the numpy backend's counts every float in float32."""
    from refllama.backends import numba_kernels
    from refllama.backends.numba_backend import NumbaBackend
    from refllama.diagnostics.diagnostic import ModelDiagnostic
    from refllama.diagnostics.memory import reads_as_stored, weights_in_memory
    from refllama.dtypes import DataType
    from refllama.formats.ggml_quants import GGMLType

    in_place = reads_as_stored("numba")
    assert in_place == NumbaBackend.reads_as_stored == {GGMLType(k).name for k in numba_kernels.GGUF_BLOCKS} | {"BF16"}
    info = ModelDiagnostic.analyze_directory(FIXTURES / "quant" / "tiny-llama-bf16").weight_info
    assert {t.dtype for t in info.tensors} == {"BF16"}
    as_read = sum(t.nbytes if len(t.shape) == 2 else 4 * t.numel for t in info.tensors)
    assert weights_in_memory(info, DataType.F32, "numba") == as_read
    assert weights_in_memory(info, DataType.F32, "numpy") == sum(4 * t.numel for t in info.tensors)
    gguf = ModelDiagnostic.analyze_directory(smollm2_path()).weight_info
    assert {t.dtype for t in gguf.tensors} <= in_place | {"F32"}
    assert weights_in_memory(gguf, DataType.F32, "numba") == gguf.total_bytes  # the file's tensor bytes
    assert weights_in_memory(gguf, DataType.F32, "numpy") > 4 * gguf.total_bytes
