"""Mixture of experts (Mixtral, Llama 4 text) against transformers' golden outputs, the routing rule, the stored
layouts, and cached decoding.

Fixtures: tools/make_moe_fixtures.py (written by transformers' save_pretrained); goldens: tools/make_moe_golden.py
(golden/manifest.json, "moe_fixtures"). About 10 s on one core.
"""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

import refllama
from refllama.config import LlamaConfig, MoEConfig, Router
from refllama.diagnostics.diagnostic import ModelDiagnostic
from refllama.errors import ConfigError, WeightError
from refllama.formats.safetensors import TensorSource
from refllama.model import moe
from refllama.model.llama import local_mask_for

from conftest import (
    F32_ATOL,
    F64_ATOL,
    FIXTURES,
    GOLDEN,
    MANIFEST,
    ROOT,
    assert_close,
    decode_rows,
    engine_cache,
    golden,
    load_npz,
)

sys.path.insert(0, str(ROOT / "tools"))
import make_sparse_checkpoint

MOE_NAMES = sorted(MANIFEST["moe_fixtures"])
LENGTHS = MANIFEST["sequence_lengths"]
# A token whose k-th and (k+1)-th router scores (HF's, float32) are closer than this may pick another expert in
# float32 from rounding alone: such positions are left out of the float32 comparisons, and counted.
ROUTER_MARGIN = 1e-4

engines = engine_cache("numpy")


def hf_routing(name: str, tag: str) -> list[moe.Routing]:
    """HF's routing of the length-48 sequence per MoE layer, by refllama's rule, from HF's router logits."""
    config = engines(name).config
    return [moe.route(logits, config.moe) for logits in golden(name)[f"router_logits_48_{tag}"]]


def near_ties(name: str, tag: str) -> np.ndarray:
    """(48,) bool: positions where some MoE layer's routing is within ROUTER_MARGIN of a tie."""
    return np.any([r.margin < ROUTER_MARGIN for r in hf_routing(name, tag)], axis=0)


@pytest.mark.parametrize("name", MOE_NAMES)
@pytest.mark.parametrize("length", LENGTHS)
def test_logits_match_hf_float64(name, length):
    g = golden(name)
    assert_close(engines(name, "float64").logits(g[f"ids_{length}"]), g[f"logits_{length}_f64"], F64_ATOL)


@pytest.mark.parametrize("name", MOE_NAMES)
@pytest.mark.parametrize("length", LENGTHS)
def test_logits_match_hf_float32(name, length):
    g = golden(name)
    ours, ref = engines(name).logits(g[f"ids_{length}"]), g[f"logits_{length}_f32"]
    if length == max(LENGTHS):
        skip = near_ties(name, "f32")
        print(f"{name}: {skip.sum()} of {length} positions skipped as router near-ties (margin {ROUTER_MARGIN})")
        # a different expert at a near-tie moves the later positions too: compare up to the first one
        stop = int(np.argmax(skip)) if skip.any() else length
        ours, ref = ours[:stop], ref[:stop]
    assert_close(ours, ref, F32_ATOL)


@pytest.mark.parametrize("name", MOE_NAMES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_expert_choice_and_router_logits_match_hf(name, dtype):
    """The trace's router logits are HF's, and the chosen experts are HF's wherever the choice is not a near-tie."""
    tag = "f32" if dtype == "float32" else "f64"
    engine, g = engines(name, dtype), golden(name)
    trace = engine.trace(g["ids_48"])
    clear = ~near_ties(name, tag)
    for layer, ref_logits, ref in zip(engine.config.moe.layers, g[f"router_logits_48_{tag}"], hf_routing(name, tag),
                                      strict=True):
        np.testing.assert_allclose(trace[f"layers.{layer}.router_logits"], ref_logits, rtol=0,
                                   atol=F32_ATOL if tag == "f32" else F64_ATOL)
        np.testing.assert_array_equal(trace[f"layers.{layer}.experts"][clear], ref.experts[clear])


@pytest.mark.parametrize("name", MOE_NAMES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_greedy_matches_hf(name, dtype):
    g = golden(name)
    tag = "f32" if dtype == "float32" else "f64"
    assert engines(name, dtype).generate_ids(g["ids_10"], 16, stop_at_eos=False) == g[f"greedy_{tag}"].tolist()


@pytest.mark.parametrize("name", MOE_NAMES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cached_decoding_equals_full_pass(name, dtype):
    """Token-by-token decoding through the KV cache, past chunk and sliding-window boundaries, equals one pass."""
    engine, ids = engines(name, dtype), golden(name)["ids_48"]
    atol = F32_ATOL if dtype == "float32" else F64_ATOL
    np.testing.assert_allclose(decode_rows(engine, ids, 5), engine.logits(ids), rtol=0, atol=atol)


def test_top_k_lowest_index_wins_ties():
    scores = np.array([[0.1, 0.5, 0.5, 0.2], [0.3, 0.3, 0.3, 0.3], [1.0, 0.0, 2.0, 1.0]])
    chosen, margin = moe.top_k(scores, 2)
    assert chosen.tolist() == [[1, 2], [0, 1], [2, 0]]
    np.testing.assert_array_equal(margin, [0.3, 0.0, 0.0])


def test_softmax_routing_renormalises_in_float32_and_sigmoid_routing_scales():
    logits = np.array([[2.0, -1.0, 0.5, 1.5]], dtype=np.float32)
    softmax = MoEConfig(4, 2, 8, Router.Softmax, (0,))
    r = moe.route(logits, softmax)
    p = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert r.experts.tolist() == [[0, 3]] and r.weights.dtype == np.float32
    np.testing.assert_allclose(r.weights, p[:, [0, 3]] / p[:, [0, 3]].sum(), rtol=1e-6)
    sigmoid = MoEConfig(4, 1, 8, Router.Sigmoid, (0,), shared_expert=True)
    r = moe.route(logits.astype(np.float64), sigmoid)
    assert r.experts.tolist() == [[0]] and r.weights.dtype == np.float64
    np.testing.assert_allclose(r.weights, [[1 / (1 + np.exp(-2.0))]], rtol=1e-15)
    assert r.margin[0] == pytest.approx(0.5)


def test_chunk_mask_counts_from_the_first_real_token():
    mask = np.ones((2, 1, 6), dtype=bool)
    padding = np.array([[1] * 6, [0, 1, 1, 1, 1, 1]])
    local = local_mask_for(mask, 5, padding, None, 2)  # the query at slot 5
    assert local[0, 0].tolist() == [False, False, False, False, True, True]
    assert local[1, 0].tolist() == [False, False, False, False, False, True]  # chunks {1, 2}, {3, 4}, {5, 6}


def _copy(name, tmp_path):
    folder = tmp_path / name
    shutil.copytree(FIXTURES / name, folder)
    return folder


def _tensors(folder):
    source = TensorSource(folder)
    return {n: np.array(source.get(n)) for n in source.names()}


def _rewrite(folder, tensors, config=None):
    for f in folder.glob("*.safetensors*"):
        f.unlink()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))


def test_mixtral_stacked_layout_equals_per_expert(tmp_path):
    """transformers 5's in-memory layout (mlp.gate, mlp.experts.gate_up_proj [E, 2I, H], down_proj [E, H, I])."""
    folder = _copy("mixtral", tmp_path)
    t = _tensors(folder)
    for i in range(2):
        p = f"model.layers.{i}."
        gate_up = [np.concatenate([t.pop(f"{p}block_sparse_moe.experts.{e}.w1.weight"),
                                   t.pop(f"{p}block_sparse_moe.experts.{e}.w3.weight")]) for e in range(4)]
        t[p + "mlp.experts.gate_up_proj"] = np.stack(gate_up)
        t[p + "mlp.experts.down_proj"] = np.stack([t.pop(f"{p}block_sparse_moe.experts.{e}.w2.weight")
                                                   for e in range(4)])
        t[p + "mlp.gate.weight"] = t.pop(p + "block_sparse_moe.gate.weight")
    _rewrite(folder, t)
    ids = golden("mixtral")["ids_10"]
    ours = refllama.load(folder, dtype="float64").logits(ids)
    np.testing.assert_array_equal(ours, engines("mixtral", "float64").logits(ids))


def test_llama4_per_expert_and_multimodal_layouts(tmp_path):
    """Experts unpacked into per-expert Linears (as quantized checkpoints store them), and the text model of a
    Llama4ForConditionalGeneration checkpoint (language_model. prefix, a vision tower beside it)."""
    folder = _copy("llama4", tmp_path)
    t = _tensors(folder)
    for i in (1, 3):
        p = f"model.layers.{i}.feed_forward.experts."
        gate_up, down = t.pop(p + "gate_up_proj"), t.pop(p + "down_proj")  # [E, H, 2I], [E, I, H]
        for e in range(4):
            t[f"{p}{e}.gate_proj.weight"] = np.ascontiguousarray(gate_up[e, :, :32].T)
            t[f"{p}{e}.up_proj.weight"] = np.ascontiguousarray(gate_up[e, :, 32:].T)
            t[f"{p}{e}.down_proj.weight"] = np.ascontiguousarray(down[e].T)
    text_config = json.loads((folder / "config.json").read_text())
    prefixed = {"language_model." + n: a for n, a in t.items()}
    prefixed["vision_model.patch_embedding.weight"] = np.zeros((2, 2), dtype=np.float32)
    _rewrite(folder, prefixed, {"model_type": "llama4", "architectures": ["Llama4ForConditionalGeneration"],
                                "text_config": text_config, "vision_config": {}})
    ids = golden("llama4")["ids_48"]
    ours = refllama.load(folder, dtype="float64").logits(ids)
    np.testing.assert_allclose(ours, engines("llama4", "float64").logits(ids), rtol=0, atol=F64_ATOL)


def test_missing_expert_and_bad_moe_config_are_named(tmp_path):
    folder = _copy("mixtral", tmp_path)
    t = _tensors(folder)
    del t["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    _rewrite(folder, t)
    with pytest.raises(WeightError, match=r"experts\.3\.w2\.weight"):
        refllama.load(folder)
    config = json.loads((FIXTURES / "mixtral" / "config.json").read_text())
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        LlamaConfig.from_dict({**config, "num_experts_per_tok": 5})
    config = json.loads((FIXTURES / "llama4" / "config.json").read_text())
    with pytest.raises(ConfigError, match="no_rope_layers"):
        LlamaConfig.from_dict({**config, "no_rope_layers": [1, 1, 2, 1]})
    with pytest.raises(ConfigError, match="moe_layers"):
        LlamaConfig.from_dict({**config, "moe_layers": [1, 4]})


def test_pruned_experts_are_refused_by_name(tmp_path):
    """compressed-tensors 0.20.1's moe_sparsity_config (pruned experts) is not implemented: a typed error."""
    folder = _copy("mixtral", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    block = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {},
             "moe_sparsity_config": {"format": "pruned"}}
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": block}))
    with pytest.raises(ConfigError, match="moe_sparsity_config"):
        refllama.load(folder)


# --- GGUF: a Mixtral file written by llama.cpp's own converter (tools/make_moe_gguf.py) ------------------------

GGUF_MOE = FIXTURES / "gguf_moe"
GGUF_F64_ATOL = 1e-11  # GGUF stores rms_norm_eps as float32: the same model up to that rounding


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_llama_cpp_converted_mixtral_gguf_matches_hf(dtype):
    """Stacked ffn_*_exps experts, the float32 ffn_gate_inp router, q/k un-permuted: HF's logits and greedy run."""
    g, tag = golden("mixtral_bf16"), "f32" if dtype == "float32" else "f64"
    engine = refllama.load(GGUF_MOE / "mixtral-f32.gguf", dtype=dtype)
    assert engine.config.moe.num_experts == 8 and engine.config.moe.top_k == 2
    for n in LENGTHS:
        assert_close(engine.logits(g[f"ids_{n}"]), g[f"logits_{n}_{tag}"],
                     F32_ATOL if tag == "f32" else GGUF_F64_ATOL)
    assert engine.generate_ids(g["ids_10"], 16, stop_at_eos=False) == g[f"greedy_{tag}"].tolist()


def _gguf_per_expert(src, out):
    """Rewrite a stacked-expert GGUF in the older layout, one tensor per expert (blk.N.ffn_gate.E.weight)."""
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(out), "llama")
    for field in reader.fields.values():
        if field.name.startswith(("GGUF.", "general.architecture")):
            continue
        value = field.contents()
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_array(field.name, value)
        else:
            writer.add_key_value(field.name, value, kind)
    for t in reader.tensors:
        data = np.asarray(t.data)
        if t.name.endswith("_exps.weight"):
            stem = t.name[:-len("_exps.weight")]
            for e in range(data.shape[0]):
                writer.add_tensor(f"{stem}.{e}.weight", np.ascontiguousarray(data[e]))
        else:
            writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def test_per_expert_gguf_layout_is_the_same_model(tmp_path):
    path = _gguf_per_expert(GGUF_MOE / "mixtral-f32.gguf", tmp_path / "per_expert.gguf")
    ids = golden("mixtral_bf16")["ids_48"]
    ours = refllama.load(path, dtype="float64").logits(ids)
    np.testing.assert_array_equal(ours, refllama.load(GGUF_MOE / "mixtral-f32.gguf", dtype="float64").logits(ids))


# --- Other backends: the same forward pass through their operations --------------------------------------------

OTHER_BACKENDS = [b.name for b in refllama.backends.installed() if b.name in ("numba", "mlx")]


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
@pytest.mark.parametrize("name", MOE_NAMES)
def test_other_backends_match_hf_float32(backend, name):
    g = golden(name)
    engine = refllama.load(FIXTURES / name, backend=backend)
    assert_close(engine.logits(g["ids_48"]), g["logits_48_f32"], F32_ATOL)
    assert engine.generate_ids(g["ids_10"], 16, stop_at_eos=False) == g["greedy_f32"].tolist()


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_other_backends_run_the_quantized_mixtral_gguf_as_the_reference(backend):
    """Q8_0 experts (numba reads the blocks in place) against the numpy reference on the same file."""
    ids = golden("mixtral_bf16")["ids_48"]
    reference = refllama.load(GGUF_MOE / "mixtral-q8_0.gguf").logits(ids)
    np.testing.assert_allclose(refllama.load(GGUF_MOE / "mixtral-q8_0.gguf", backend=backend).logits(ids),
                               reference, rtol=0, atol=F32_ATOL)


def _nbytes(weight) -> int:
    raw = getattr(weight, "raw", weight)  # GGUFBlockWeight: its blocks
    return int(np.asarray(raw).nbytes)


@pytest.mark.parametrize("backend", ["numpy", *OTHER_BACKENDS])
def test_decode_reads_only_the_chosen_experts(backend, monkeypatch):
    """One decode step touches top_k / num_experts of the expert weights (2 of 8 here), counted in bytes."""
    engine = refllama.load(GGUF_MOE / "mixtral-q8_0.gguf", backend=backend)
    experts = {id(lin.weight) for layer in engine.model.weights.layers for mlp in layer.mlp.experts
               for lin in vars(mlp).values()}
    total = sum(_nbytes(lin.weight) for layer in engine.model.weights.layers for mlp in layer.mlp.experts
                for lin in vars(mlp).values())
    read = []
    linear = engine.backend.linear

    def counting(x, layer):
        if id(layer.weight) in experts:
            read.append(_nbytes(layer.weight))
        return linear(x, layer)

    cache = engine.new_cache(1, 8)
    engine.forward(np.array([[1, 5, 9]]), cache)
    monkeypatch.setattr(engine.backend, "linear", counting)
    monkeypatch.setattr(engine.backend, "linears", lambda x, layers: [counting(x, layer) for layer in layers])
    engine.forward(np.array([[7]]), cache)  # one decode step
    moe = engine.config.moe
    assert len(read) == 3 * moe.top_k * len(moe.layers)  # gate, up, down of each chosen expert
    assert sum(read) == total * moe.top_k // moe.num_experts


# --- Diagnostics: published MoE shapes as sparse checkpoints (tools/make_sparse_checkpoint.py) ------------------

@pytest.mark.parametrize(("config", "variant", "total", "active"), [
    ("MIXTRAL_8X7B", "Mixtral(size='8x7B')", 46_702_792_704, 12_879_925_248),
    ("LLAMA4_SCOUT", "Llama4(name='Scout', size='17B-16E')", 107_769_861_120, 17_172_894_720),
    ("LLAMA4_MAVERICK", "Llama4(name='Maverick', size='17B-128E')", 400_711_848_960, 17_184_691_200),
])
def test_published_moe_shapes_are_detected_and_counted(tmp_path, config, variant, total, active):
    """Mixtral 8x7B: 46.7B total, 12.9B active, as published; Llama 4 text models: 17B active, 400B total for
    Maverick (Meta's 109B for Scout includes its vision encoder: the text model is 107.8B). Every expert is
    resident in the memory estimate."""
    folder = make_sparse_checkpoint.write(tmp_path / config.lower(), getattr(make_sparse_checkpoint, config), 4)
    d = ModelDiagnostic.analyze_directory(folder, context_length=4096)
    report = d.to_json()
    assert repr(d.model_type) == variant and not d.problems
    assert d.weight_info.parameter_count == report["weights"]["config_parameter_count"] == total
    assert report["weights"]["active_parameter_count"] == active
    assert d.memory_requirements.model_weights == 4 * total  # bf16 -> float32 on numpy, all experts
    json.dumps(report)


# --- Oracle: routing in traces and in `refllama compare` ---------------------------------------------------------

def test_compare_reports_expert_agreement_and_the_first_layer_that_differs(capsys):
    from refllama.cli import main
    from refllama.testing.comparison import expert_agreement

    ids = golden("mixtral_bf16")["ids_48"]
    ref = engines("mixtral_bf16", "float64").trace(ids)
    assert [(r.layer, r.agreement, r.first_token) for r in
            expert_agreement(ref, engines("mixtral_bf16").trace(ids))] == [(0, 1.0, None), (1, 1.0, None)]
    quantized = refllama.load(GGUF_MOE / "mixtral-q8_0.gguf").trace(ids)
    rows = expert_agreement(ref, quantized)
    expected = [np.mean((np.sort(ref[f"layers.{r.layer}.experts"], -1)
                         == np.sort(quantized[f"layers.{r.layer}.experts"], -1)).all(-1)) for r in rows]
    assert [r.agreement for r in rows] == expected and min(expected) < 1.0  # Q8_0 moves some choices
    main(["compare", str(FIXTURES / "mixtral_bf16"), str(GGUF_MOE / "mixtral-q8_0.gguf"), "--json",
          "--ids", ",".join(map(str, ids))])
    report = json.loads(capsys.readouterr().out)
    first = next(r for r in rows if r.first_token is not None)
    assert report["first_routing_difference"] == first.layer
    assert [r["agreement"] for r in report["routing"]] == expected


# --- Quantized MoE: compressed-tensors with the router left unquantized -----------------------------------------

@pytest.mark.parametrize("name", ["mixtral", "llama4"])
def test_compressed_tensors_moe_with_an_unquantized_router(tmp_path, name):
    """MLPs (experts, Llama 4's shared expert and dense layers) W4A16 group 32 as llm-compressor quantizes them
    (refllama's writer equals llm-compressor's byte for byte: test_quant_layer_dtypes.py), the router ignored
    (`re:.*block_sparse_moe.gate` / `re:.*router`, as llm-compressor's MoE examples do): written as a
    compressed-tensors folder, read back with PackedIntWeight experts and a float router, same logits."""
    from refllama.dtypes import DataType, LayerDataTypeConfig, MLPComponent
    from refllama.formats.checkpoint import quantized_linears
    from refllama.quant.quantize import (
        apply_layer_dtypes,
        compressed_tensors_block,
        save_compressed_tensors,
        weight_presets,
    )
    from refllama.quant.types import PackedIntWeight

    spec, _ = weight_presets(32)[DataType.W4A16]
    types = LayerDataTypeConfig(mlp_weights=dict.fromkeys(MLPComponent, DataType.W4A16))
    engine = engines(name, "float64")
    quantized = apply_layer_dtypes(engine.source_weights, types, group_size=32)
    config = json.loads((FIXTURES / name / "config.json").read_text())
    router = "re:.*block_sparse_moe.gate" if name == "mixtral" else "re:.*router"
    block = compressed_tensors_block(spec, False, "pack-quantized", ignore=["lm_head", router, "re:.*self_attn.*"])
    folder = save_compressed_tensors(tmp_path / name, config, quantized, block)
    reloaded = refllama.load(folder, dtype="float64")
    layer = reloaded.model.weights.layers[engine.config.moe.layers[0]].mlp
    assert isinstance(layer.experts[0].down_proj.weight, PackedIntWeight)
    assert not hasattr(layer.router.weight, "packed")  # the router stays float
    assert len(quantized_linears(reloaded.model.weights)) == len(quantized_linears(quantized))
    ids = golden(name)["ids_48"]
    expected = refllama.GenericLlamaEngine(engine.config, quantized, engine.backend).logits(ids)
    np.testing.assert_array_equal(reloaded.logits(ids), expected)
    assert np.abs(expected - engine.logits(ids)).max() > 1e-3  # the experts are really quantized


def test_gguf_matches_llama_cpp():
    """llama.cpp's own logits on the same files (golden/gguf_moe_llamacpp.npz, llama-cpp-python 0.3.36, float32 KV
    cache). F32: within the f32 profile (measured 1.4e-6). Q8_0: llama.cpp quantizes each matmul's activations to
    Q8_0 blocks, refllama multiplies by the dequantized weights, so they are different functions: measured max
    0.93, mean 0.017, top-1 equal everywhere, held to the 4-bit profile; greedy runs equal for both files."""
    from refllama.testing import assert_logits_close

    g = load_npz(GOLDEN / "gguf_moe_llamacpp.npz")
    for outtype, profile in (("f32", "f32"), ("q8_0", "q4")):
        engine = refllama.load(GGUF_MOE / f"mixtral-{outtype}.gguf")
        report = assert_logits_close(g[f"logits_48_{outtype}"], engine.logits(g["ids_48"]), profile)
        assert report.top1_agreement == 1.0
        assert engine.generate_ids(g["ids_10"], 16, stop_at_eos=False) == g[f"greedy_{outtype}"].tolist()
