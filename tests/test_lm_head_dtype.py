"""An int8 lm_head: stored by a W8A8 checkpoint (`ignore: []`), or quantized at load with `lm_head_dtype="int8"`.

SmolLM2-135M W8A8 is made twice in temporary folders by tools/make_quant_golden.py (~3 s each): with the head
float (tied to the embeddings, as compressed-tensors' default `ignore: ["lm_head"]` leaves it) and with an int8
copy of the tied table stored as lm_head. The stored head must be exactly what `lm_head_dtype="int8"` makes from
the float folder, and the logits of both routes identical; the head's output is checked against its reference
arithmetic (refllama/quant/int8.py) bit for bit and against the float64 product of the dequantized operands.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import refllama
from refllama.dtypes import DataType
from refllama.errors import InputError
from refllama.quant import Int8Weight
from refllama.quant.int8 import quantize_tokens_hf, w8a8_matmul
from refllama.quant.quantize import quantize_weight, weight_presets

from conftest import ROOT, smollm2_path

IDS = np.array([1, 504, 3458, 282, 4649, 314, 9381, 30, 1206, 1811, 28, 253, 1789, 17, 44, 17], np.int64)


def _write(folder, int8_head: bool):
    smollm2_path()
    sys.path.insert(0, str(ROOT / "tools"))
    import make_quant_golden

    return make_quant_golden.write_refllama(folder, int8_head=int8_head)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {head: _write(tmp_path_factory.mktemp(f"w8a8_{head}_head"), head == "int8") for head in ("float", "int8")}


@pytest.fixture(scope="module")
def int8_head_engine(folders):
    return refllama.load(folders["int8"])


def test_a_stored_int8_head_is_a_quantized_copy_of_the_tied_table(int8_head_engine):
    weights = int8_head_engine.model.weights
    head = weights.lm_head
    assert isinstance(head, Int8Weight) and head.activation is not None and head.activation.semantics == "hf"
    assert head.q.dtype == np.int8 and head.shape == (49152, 576)
    assert weights.embeddings.dtype == np.float32  # the lookup keeps the float table
    spec, _ = weight_presets()[DataType.W8A8]
    expected = quantize_weight(np.asarray(weights.embeddings), spec)
    np.testing.assert_array_equal(head.q, expected.q)
    np.testing.assert_array_equal(head.scale, expected.scale)
    assert "lm_head: int8 W8A8 per-channel" in int8_head_engine.describe()


def test_the_head_runs_its_reference_arithmetic(int8_head_engine):
    """Logits = the W8A8 reference on the final norm, bit for bit; and within float32 rounding of the float64
    product of the dequantized activation codes and weight codes (the exact-dequant function)."""
    trace = int8_head_engine.trace(IDS)
    head = int8_head_engine.model.weights.lm_head
    x = trace["final_norm"]  # (T, hidden)
    np.testing.assert_array_equal(trace["logits"], w8a8_matmul(x, head.q, head.scale, "hf"))
    codes, xs = quantize_tokens_hf(x)
    exact = (codes.astype(np.float64) * xs) @ (np.asarray(head.q, np.float64) * head.scale).T  # (T, vocab)
    np.testing.assert_allclose(trace["logits"], exact, rtol=0, atol=1e-5 * np.abs(exact).max())


def test_lm_head_dtype_int8_on_the_float_head_checkpoint_is_the_stored_int8_head(folders, int8_head_engine):
    float_head = refllama.load(folders["float"])
    assert isinstance(float_head.model.lm_head.weight, np.ndarray)
    assert "lm_head: float32 (tied to the embeddings)" in float_head.describe()
    quantized = refllama.load(folders["float"], lm_head_dtype="int8")
    head = quantized.model.weights.lm_head
    assert isinstance(head, Int8Weight) and head.activation is not None
    np.testing.assert_array_equal(head.q, int8_head_engine.model.weights.lm_head.q)
    assert "quantized at load: lm_head_dtype='int8'" in repr(quantized)
    np.testing.assert_array_equal(quantized.logits(IDS), int8_head_engine.logits(IDS))
    assert not np.array_equal(float_head.logits(IDS), quantized.logits(IDS))


def test_lm_head_dtype_bad_values_are_typed_errors(folders):
    for value in ("int4", "float8", 8, True):
        with pytest.raises(InputError, match="lm_head_dtype"):
            refllama.load(folders["float"], lm_head_dtype=value)
    with pytest.raises(InputError, match="shards"):
        refllama.load(folders["float"], lm_head_dtype="int8", shards=2)


def test_lm_head_dtype_refuses_a_head_stored_in_blocks():
    """The numba backend keeps the GGUF's Q8_0 table as blocks: it is not quantized a second time."""
    pytest.importorskip("numba")
    with pytest.raises(InputError, match="already stored as Q8_0 blocks"):
        refllama.load(smollm2_path(), backend="numba", lm_head_dtype="int8")


def test_cli_states_the_quantized_head(folders):
    result = subprocess.run([sys.executable, "-m", "refllama", "generate", str(folders["float"]), "-p", "Hi",
                             "--max-new-tokens", "2", "--lm-head-dtype", "int8"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "lm_head: int8 W8A8 per-channel (quantized at load" in result.stderr
