"""Quantizing a float checkpoint at load (compressed-tensors' formulas), per-layer data types, precision switching.

tests/fixtures/quant/tiny-w8a8, tiny-w8a16-*, tiny-w4a16-* were made by llm-compressor 0.14 (compressed-tensors
0.19) from tiny-llama-bf16 (bf16 weights). Quantizing that base here, with each fixture's own scheme read from its
config.json, must give the library's codes, scales and zero points bit for bit, for every Linear.
"""

from __future__ import annotations

import numpy as np
import pytest

import refllama
from refllama.backends import get_backend
from refllama.config import LlamaConfig
from refllama.dtypes import AttentionComponent, DataType, LayerDataTypeConfig, MLPComponent
from refllama.errors import ConfigError
from refllama.formats.checkpoint import load_weight_map, quantized_linears
from refllama.formats.safetensors import SafetensorsFile, TensorSource
from refllama.quant import Int8Weight, PackedIntWeight, dequantize
from refllama.quant.quantize import (
    apply_layer_dtypes,
    dequantize_weights,
    quantize_weight,
    set_activation_semantics,
)
from refllama.quant.types import codes_and_zero

from conftest import FIXTURES

QUANT = FIXTURES / "quant"
BASE = QUANT / "tiny-llama-bf16"
LIBRARY_MADE = ["tiny-w8a8", "tiny-w8a16-g32", "tiny-w8a16-ch", "tiny-w4a16-g32", "tiny-w4a16-g32-asym"]
ATTN = [c for c in AttentionComponent if c is not AttentionComponent.RotaryEmbedding]
IDS = np.array([1, 36, 35, 204, 129, 152, 155, 7, 124, 37], dtype=np.int64)


def _load(folder, **options):
    return load_weight_map(TensorSource(folder), LlamaConfig.from_dir(folder), **options)


def _engine(weights, folder=BASE, dtype="float32"):
    return refllama.GenericLlamaEngine(LlamaConfig.from_dir(folder), weights, get_backend("numpy", dtype))


def _signed(weight):
    """(q, zp) as compressed-tensors defines them: signed codes and signed zero points, whatever the container."""
    codes, zero = codes_and_zero(weight)
    offset = 1 << (weight.bits - 1) if isinstance(weight, PackedIntWeight) else 0
    return codes.astype(np.int32) - offset, np.asarray(zero, np.int32) - offset


def _every(dtype: DataType, **kw) -> LayerDataTypeConfig:
    return LayerDataTypeConfig(embedding=DataType.BF16, layer_norm=DataType.BF16,
                               attention_weights={c: dtype for c in ATTN}, mlp_weights={c: dtype for c in MLPComponent},
                               **kw)


def _assert_same_quantization(ours, theirs):
    assert len(ours) == len(theirs) == 14
    for a, b in zip(ours, theirs, strict=True):
        qa, za = _signed(a)
        qb, zb = _signed(b)
        np.testing.assert_array_equal(qa, qb)
        np.testing.assert_array_equal(np.broadcast_to(za, np.shape(zb)) if np.ndim(za) == 0 else za,
                                      np.broadcast_to(zb, np.shape(za)) if np.ndim(zb) == 0 else zb)
        assert np.asarray(a.scale).dtype == np.asarray(b.scale).dtype  # bf16, the weight dtype
        np.testing.assert_array_equal(np.asarray(a.scale), np.asarray(b.scale))


@pytest.mark.parametrize("name", LIBRARY_MADE)
def test_quantizing_the_base_reproduces_the_library_checkpoint_bit_for_bit(name):
    config = LlamaConfig.from_dir(QUANT / name)
    spec = config.quantization_config.config_groups["group_0"].weights
    base = _load(BASE)
    ours = []
    for layer in base.layers:
        for lin in (*vars(layer.self_attention).values(), *vars(layer.mlp).values()):
            ours.append(quantize_weight(lin.weight, spec))
    _assert_same_quantization(ours, quantized_linears(_load(QUANT / name)))


@pytest.mark.parametrize("name,dtype,group_size", [("tiny-w8a8", DataType.W8A8, 128),
                                                   ("tiny-w8a16-ch", DataType.W8A16, 128),
                                                   ("tiny-w4a16-g32", DataType.W4A16, 32),
                                                   ("tiny-w4a16-g32-asym", DataType.U4, 32)])
def test_layer_dtype_presets_equal_the_library_presets(name, dtype, group_size):
    ours = apply_layer_dtypes(_load(BASE), _every(dtype), group_size=group_size)
    theirs = _load(QUANT / name)
    _assert_same_quantization(quantized_linears(ours), quantized_linears(theirs))
    with_activations = {w.activation is not None for w in quantized_linears(ours) if isinstance(w, Int8Weight)}
    assert with_activations <= {dtype is DataType.W8A8}
    if name == "tiny-w8a8":  # the same model: the same logits as the library's folder
        np.testing.assert_allclose(_engine(ours).logits(IDS), _engine(theirs, QUANT / name).logits(IDS),
                                   rtol=0, atol=1e-5)


def test_the_issue_layout_and_int8_activations():
    """q/k/v and gate/up W8A16, o and down BF16, norms F32; activations I8 turns the int8 ones into W8A8."""
    A, M = AttentionComponent, MLPComponent
    layout = LayerDataTypeConfig(
        embedding=DataType.F32, layer_norm=DataType.F32,
        attention_weights={A.QueryProjection: DataType.W8A16, A.KeyProjection: DataType.W8A16,
                           A.ValueProjection: DataType.W8A16, A.OutputProjection: DataType.BF16},
        mlp_weights={M.GateProjection: DataType.W8A16, M.UpProjection: DataType.W8A16,
                     M.DownProjection: DataType.BF16})
    base = _load(BASE)
    weights = apply_layer_dtypes(base, layout)
    layer = weights.layers[0]
    assert isinstance(layer.self_attention.q_proj.weight, Int8Weight)
    assert layer.self_attention.q_proj.weight.activation is None
    assert layer.self_attention.o_proj.weight.dtype.name == "bfloat16"
    assert layer.input_layernorm is base.layers[0].input_layernorm  # bf16 -> F32 is exact: the view is kept
    assert len(quantized_linears(weights)) == 10
    w8a8 = apply_layer_dtypes(base, LayerDataTypeConfig(**{**vars(layout), "activations": DataType.I8}))
    assert {w.activation.semantics for w in quantized_linears(w8a8)} == {"hf"}
    plain, mixed, int8 = (_engine(w).logits(IDS) for w in (base, weights, w8a8))
    assert 1e-4 < np.abs(mixed - plain).max() < 0.5  # W8A16 moves the logits a little (notes: 8-bit < 0.25)
    assert np.abs(int8 - mixed).max() > 1e-4


def test_set_precision_rederives_from_the_source_without_reading_files(monkeypatch):
    base = _load(BASE)
    engine = _engine(base)
    original = engine.logits(IDS)
    reference = _engine(_load(QUANT / "tiny-w8a8"), QUANT / "tiny-w8a8").logits(IDS)

    def no_reads(self, name):
        raise AssertionError(f"set_precision read {name} from a file")

    monkeypatch.setattr(SafetensorsFile, "get", no_reads)
    engine.set_precision(_every(DataType.W8A8))
    assert engine.config.layer_dtypes == _every(DataType.W8A8)
    np.testing.assert_allclose(engine.logits(IDS), reference, rtol=0, atol=1e-5)
    engine.set_precision(_every(DataType.W8A8), quant_semantics="vllm")
    assert np.abs(engine.logits(IDS) - reference).max() > 1e-3
    engine.set_precision(LayerDataTypeConfig(embedding=DataType.BF16, layer_norm=DataType.BF16))
    np.testing.assert_array_equal(engine.logits(IDS), original)  # back to the checkpoint as stored
    engine.set_precision(_every(DataType.BF16))
    np.testing.assert_array_equal(engine.logits(IDS), original)  # bf16 -> BF16 changes nothing


def test_config_layer_dtypes_applies_through_from_diagnostic():
    """The spec's mixed-precision example: replace(diagnostic.config, layer_dtypes=...), then from_diagnostic."""
    from dataclasses import replace

    from refllama.diagnostics.diagnostic import ModelDiagnostic

    diagnostic = ModelDiagnostic.analyze_directory(BASE)
    layout = _every(DataType.W8A8)
    diagnostic = replace(diagnostic, config=replace(diagnostic.config, layer_dtypes=layout))
    engine = refllama.GenericLlamaEngine.from_diagnostic(diagnostic)
    assert engine.config.layer_dtypes == layout
    assert len(quantized_linears(engine.model.weights)) == 14  # 7 Linears x 2 layers
    expected = _engine(apply_layer_dtypes(_load(BASE), layout)).logits(IDS)
    np.testing.assert_array_equal(engine.logits(IDS), expected)


def test_semantics_switch_and_dequantize_helpers():
    folder = QUANT / "tiny-w8a8"
    g = np.load(folder / "golden.npz")
    weights = _load(folder)
    vllm = set_activation_semantics(weights, "vllm")
    assert {w.activation.semantics for w in quantized_linears(vllm)} == {"vllm"}
    np.testing.assert_allclose(_engine(vllm, folder).logits(g["ids_b"]), g["logits_b_int8vllm"], rtol=0, atol=2e-5)
    assert len(quantized_linears(dequantize_weights(weights))) == 14  # W8A8 keeps its integer GEMM
    asym = _load(QUANT / "tiny-w4a16-g32-asym")
    assert not quantized_linears(dequantize_weights(asym))


def test_layer_dtype_errors_name_the_field():
    base = _load(BASE)
    with pytest.raises(ConfigError, match=r"layer_dtypes\.embedding"):
        apply_layer_dtypes(base, LayerDataTypeConfig(embedding=DataType.I8))
    with pytest.raises(ConfigError, match=r"mlp\.down_proj.*group_size 48 does not divide"):
        apply_layer_dtypes(base, LayerDataTypeConfig(mlp_weights={MLPComponent.DownProjection: DataType.W4A16}),
                           group_size=48)
    with pytest.raises(ConfigError, match="quantized already"):
        apply_layer_dtypes(_load(QUANT / "tiny-w8a8"), _every(DataType.W8A16))
    with pytest.raises(ConfigError, match="layer_norm"):
        apply_layer_dtypes(base, LayerDataTypeConfig(layer_norm=DataType.W8A8))


def test_all_zero_rows_and_groups_quantize_like_the_library():
    """A zero scale becomes the dtype's eps (compressed-tensors), codes 0; asymmetric zero groups get zp 0."""
    w = np.zeros((4, 64), np.float32)
    w[1] = np.linspace(-1, 2, 64)
    sym = quantize_weight(w, LlamaConfig.from_dir(QUANT / "tiny-w4a16-g32").quantization_config
                          .config_groups["group_0"].weights)
    assert np.asarray(sym.scale)[0, 0] == np.finfo(np.float32).eps
    asym = quantize_weight(w, LlamaConfig.from_dir(QUANT / "tiny-w4a16-g32-asym").quantization_config
                           .config_groups["group_0"].weights)
    for weight in (sym, asym):
        deq = dequantize(weight)
        assert not deq[0].any() and not deq[2:].any()
        half_step = np.repeat(np.asarray(weight.scale, np.float32)[1], 32) / 2  # (64,): group 32
        assert (np.abs(deq[1] - w[1]) <= half_step * (1 + 1e-6)).all()


@pytest.mark.parametrize("name,dtype,group_size,fmt", [("tiny-w8a8", DataType.W8A8, 128, "int-quantized"),
                                                       ("tiny-w4a16-g32", DataType.W4A16, 32, "pack-quantized"),
                                                       ("tiny-w4a16-g32-asym", DataType.U4, 32, "pack-quantized")])
def test_written_checkpoint_has_the_librarys_tensors_byte_for_byte(tmp_path, name, dtype, group_size, fmt):
    """refllama's compressed-tensors writer on the base quantized at load = llm-compressor's file, tensor by
    tensor (names, dtypes, shapes, bytes), and it loads back to the same weights."""
    from refllama.quant.config import QuantizationSpec
    from refllama.quant.quantize import compressed_tensors_block, save_compressed_tensors, weight_presets

    spec, activations = weight_presets(group_size)[dtype]
    assert isinstance(spec, QuantizationSpec)
    config = LlamaConfig.from_dir(BASE).to_hf_dict()
    folder = save_compressed_tensors(tmp_path / name, config, apply_layer_dtypes(_load(BASE), _every(dtype),
                                                                                 group_size=group_size),
                                     compressed_tensors_block(spec, activations, fmt))
    ours, theirs = TensorSource(folder), TensorSource(QUANT / name)
    assert ours.names() == theirs.names()
    for tensor in ours.names():
        a, b = ours.get(tensor), theirs.get(tensor)
        assert (ours.info(tensor).dtype, a.shape) == (theirs.info(tensor).dtype, b.shape), tensor
        assert a.tobytes() == b.tobytes(), tensor
    reloaded = _load(folder)
    _assert_same_quantization(quantized_linears(reloaded), quantized_linears(_load(QUANT / name)))
