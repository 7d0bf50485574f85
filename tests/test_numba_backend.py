"""What only the numba backend does: bfloat16 matrices and GGUF blocks read as stored (memory-mapped), its thread
count and kernel cache, SmolLM2 from its Q4_1 GGUF through the fused kernels, and its peak memory.

Every operation and the golden fixtures, on this backend as on every other, are the conformance suite's
(refllama/testing/conformance.py, run by tests/test_conformance.py; measured values in docs/numba.md). Bounds
here: bfloat16 matrices give the float32 kernel's result on the converted matrix bit for bit; SmolLM2 against HF
float32: 2e-4 (tests/test_smollm2.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import refllama
from refllama.backends import get_backend
from refllama.config import LlamaConfig
from refllama.errors import BackendError
from refllama.formats.checkpoint import load_weight_map
from refllama.formats.ggml_quants import GGMLType
from refllama.formats.gguf import GGUFFile
from refllama.formats.gguf_llama import config_from_gguf
from refllama.formats.safetensors import TensorSource
from refllama.model.weights import Linear
from refllama.quant.gguf_blocks import GGUFBlockWeight
from refllama.testing import random_weights

from conftest import GOLDEN, QUANT, SMOLLM2_ATOL, assert_smollm2_logits, decode_rows, load_npz, smollm2_path

pytest.importorskip("numba")

from refllama.backends import numba_kernels

BF16 = np.dtype(ml_dtypes.bfloat16)


@pytest.fixture(scope="module")
def xp():
    return get_backend("numba", "float32")


# ---------------------------------------------------------------- bfloat16 matrices read as stored


@pytest.mark.parametrize("M,N,K", [(1, 5, 7), (1, 70, 64), (3, 8, 64), (9, 4, 33), (13, 7, 576)])
def test_bfloat16_weights_are_read_as_stored_with_the_float32_products(xp, M, N, K):
    """A bfloat16 matrix widened as the kernels read it gives the float32 kernel's result on the converted matrix,
    bit for bit (same products, same order), and its rows through `embedding` are the converted rows."""
    rng = np.random.default_rng(M * 100 + N * 10 + K)
    x = rng.standard_normal((1, M, K)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(BF16)
    assert xp.asarray(w) is w  # kept as stored: no float32 copy
    np.testing.assert_array_equal(xp.linear(x, Linear(w)), xp.linear(x, Linear(w.astype(np.float32))))
    ids = np.array([[0, N - 1], [2, 1]])
    got = xp.embedding(w, ids)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, w.astype(np.float32)[ids])


def test_bfloat16_checkpoint_stays_memory_mapped(xp):
    """Loading a bfloat16 folder keeps its matrices as the file's mapped bytes (vectors become float32), and the
    logits are bit for bit those of the same backend on the weights converted to float32 first."""
    folder = QUANT / "tiny-llama-bf16"
    engine = refllama.load(folder, backend="numba")
    weights = engine.model.weights
    gate = weights.layers[0].mlp.gate_proj.weight
    assert gate.dtype == BF16 and not gate.flags.owndata
    np.testing.assert_array_equal(gate.view(np.uint16),
                                  TensorSource(folder).get("model.layers.0.mlp.gate_proj.weight").view(np.uint16))
    assert weights.final_norm.dtype == np.float32
    config = LlamaConfig.from_dir(folder)
    converted = load_weight_map(TensorSource(folder), config).map(
        lambda a: a.astype(np.float32) if getattr(a, "dtype", None) == BF16 else a)
    reference = refllama.GenericLlamaEngine(config, converted, xp)
    assert reference.model.weights.layers[0].mlp.gate_proj.weight.dtype == np.float32
    ids = np.arange(1, 40)
    np.testing.assert_array_equal(engine.logits(ids), reference.logits(ids))


# ---------------------------------------------------------------- GGUF blocks: the fused decode matvec


@pytest.mark.parametrize("ggml_type", [GGMLType(kind).name for kind in numba_kernels.GGUF_BLOCKS])
def test_gguf_decode_matvec_on_awkward_shapes(xp, ggml_type):
    """Every block type is read by the fused matvec up to SMALL_BATCH tokens: an odd number of blocks per row, row
    counts around the kernels' 4- and 64-row steps, 1..8 tokens. The dequantization (embedding rows) equals ggml's
    bit for bit. Each product is within 4 eps32 of sum_k |x_k w_k| of the exact (float64) product with the
    dequantized matrix: the scale a float32 dot product's rounding error grows with, so single outputs that cancel
    are held as tightly as the others (measured: at most 1.6 eps32, Q4_0's offset term; NumPy's float32: 0.5)."""
    rng = np.random.default_rng(int(GGMLType[ggml_type]))
    block = numba_kernels.GGUF_BLOCKS[int(GGMLType[ggml_type])][1]
    eps = float(np.finfo(np.float32).eps)
    for N, blocks in ((1, 1), (7, 3), (66, 5)):
        K = blocks * block
        weight = random_weights.gguf_weight(rng, ggml_type, N, K)
        dense = weight.dequantize(np.float64)
        np.testing.assert_array_equal(xp.embedding(weight, np.arange(N)), dense.astype(np.float32))
        for T in range(1, 9):
            x = rng.standard_normal((T, K)).astype(np.float32)
            got = xp.linear(x, Linear(weight))
            assert got.shape == (T, N)
            error = np.abs(got - x.astype(np.float64) @ dense.T)
            assert (error <= 4 * eps * (np.abs(x.astype(np.float64)) @ np.abs(dense.T))).all()


# ---------------------------------------------------------------- GGUF blocks the kernels do not read


def test_unsupported_block_types_raise(xp):
    weight = GGUFBlockWeight(np.zeros((1, 84), np.uint8), GGMLType.Q2_K, (1, 256))
    with pytest.raises(BackendError, match="Q2_K"):
        xp.linear(np.ones((1, 32), np.float32), Linear(weight))


# ---------------------------------------------------------------- threads and the kernel cache


def test_thread_count_from_the_environment(monkeypatch):
    from refllama.backends import numba_backend

    monkeypatch.setenv("REFLLAMA_NUM_THREADS", "1")
    assert numba_backend.thread_count() == 1
    monkeypatch.delenv("REFLLAMA_NUM_THREADS")
    assert numba_backend.thread_count() == min(2, numba_kernels.numba.config.NUMBA_NUM_THREADS)
    for bad in ("0", "two"):
        monkeypatch.setenv("REFLLAMA_NUM_THREADS", bad)
        with pytest.raises(BackendError, match="REFLLAMA_NUM_THREADS"):
            numba_backend.thread_count()


def test_compiled_kernels_are_cached_outside_the_sources():
    cache = Path(numba_kernels.numba.config.CACHE_DIR).resolve()
    sources = Path(numba_kernels.__file__).resolve().parent
    assert cache == Path(numba_kernels.cache_dir()).resolve()
    assert sources != cache and sources not in cache.parents


# ---------------------------------------------------------------- SmolLM2 from its Q4_1 GGUF, read as blocks


@pytest.fixture(scope="module")
def smollm2():
    return refllama.load(smollm2_path(), backend="numba"), load_npz(GOLDEN / "smollm2.npz")


def test_smollm2_keeps_its_blocks_memory_mapped(smollm2):
    engine, _ = smollm2
    weights = engine.model.weights
    up = weights.layers[0].mlp.up_proj.weight
    assert isinstance(up, GGUFBlockWeight) and up.ggml_type is GGMLType.Q4_1
    assert up.raw.dtype == np.uint8 and not up.raw.flags.owndata and not up.raw.flags.writeable  # the mapped file
    assert isinstance(weights.embeddings, GGUFBlockWeight) and weights.embeddings.ggml_type is GGMLType.Q8_0
    numpy_engine = refllama.load(smollm2_path(), backend="numpy")  # the numpy backend still dequantizes at load
    assert numpy_engine.model.weights.layers[0].mlp.up_proj.weight.dtype == np.float32


@pytest.mark.parametrize("prompt", ["chat", "paragraph", "code", "unicode"])
def test_smollm2_float32_logits_match_hf(smollm2, prompt):
    engine, g = smollm2
    assert_smollm2_logits(engine.logits(g[f"{prompt}_ids"]), g, prompt)


def test_smollm2_greedy_continuation_matches_hf(smollm2):
    engine, g = smollm2
    assert engine.generate_ids(g["chat_ids"], 32) == g["chat_greedy_f32"].tolist()


def test_smollm2_cached_decoding_through_the_fused_kernels(smollm2):
    """Decode steps (one token: the fused Q4_1/Q8_0 matvec) against HF's logits of the full sequence."""
    engine, g = smollm2
    logits = decode_rows(engine, g["code_ids"], prefill=40)
    top_ids = g["code_topk_ids"].astype(np.int64)
    np.testing.assert_allclose(np.take_along_axis(logits, top_ids, -1), g["code_topk_f32"], rtol=0,
                               atol=SMOLLM2_ATOL)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS is read from Linux's /proc")
def test_q4_1_gguf_peak_rss_is_about_its_file_size():
    """The target bound: the model's peak RSS, loading and generating from the Q4_1 GGUF, <= 1.3 x file size +
    KV cache. Counted in a fresh process from its RSS once the interpreter, NumPy, the compiled kernels and the
    GGUF metadata (the config) are in; the tokenizer is not built (its Python objects take about 35 MB, which
    tools/bench.py's whole-process figure includes)."""
    path = smollm2_path()
    script = (
        "import numpy as np\n"
        "from refllama.backends import get_backend, numba_kernels\n"
        "from refllama.engine import GenericLlamaEngine\n"
        "from refllama.formats.gguf import GGUFFile\n"
        "from refllama.formats.gguf_llama import GGUFTensorSource, config_from_gguf\n"
        "from refllama.formats.checkpoint import load_weight_map\n"
        "from refllama.loading import stored_block_types\n"
        f"gguf = GGUFFile({str(path)!r})\n"
        "config, backend = config_from_gguf(gguf), get_backend('numba')\n"
        "numba_kernels.warm_up()\n"
        "open('/proc/self/clear_refs', 'w').write('5')  # reset the peak (VmHWM) to the current RSS\n"
        "status = lambda key: int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith(key)))\n"
        "base = status('VmRSS:')\n"
        "source = GGUFTensorSource(gguf, config, stored_block_types(backend))\n"
        "engine = GenericLlamaEngine(config, load_weight_map(source, config), backend)\n"
        "engine.generate_ids(np.arange(100, 164), 64, stop_at_eos=False)\n"
        "print(base, status('VmHWM:'))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    base_kb, peak_kb = map(int, out.stdout.split()[-2:])
    c = config_from_gguf(GGUFFile(path))
    kv_bytes = 2 * c.num_hidden_layers * c.num_key_value_heads * 128 * c.head_dim * 4
    assert (peak_kb - base_kb) * 1024 <= 1.3 * path.stat().st_size + kv_bytes
