"""Diagnostics: variant detection, header-only analysis, memory estimates that hold when measured, the limit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import refllama
from refllama.config import LlamaConfig
from refllama.diagnostics.diagnostic import (
    Custom,
    Distilled,
    MetaLlama,
    ModelDiagnostic,
    TinyLlama,
    detect_variant,
    parameter_count,
    verify,
)
from refllama.diagnostics.memory import (
    BackendConfig,
    MemoryLimitError,
    QuantizeToDataType,
    ReduceBatchSize,
    ReduceKVCacheSize,
    UseModelSharding,
    estimate,
    parse_bytes,
)
from refllama.dtypes import DataType

from conftest import FIXTURE_NAMES, FIXTURES, ROOT
from test_config import LLAMA_31_8B_INSTRUCT, TINYLLAMA_CHAT

sys.path.insert(0, str(ROOT / "tools"))
import make_sparse_checkpoint
import measure_memory

# Configs as the real checkpoints publish them (the fields that matter), and what they must be detected as.
LLAMA3 = {**LLAMA_31_8B_INSTRUCT, "rope_scaling": None, "max_position_embeddings": 8192, "eos_token_id": 128001}
LLAMA32_1B = {**LLAMA_31_8B_INSTRUCT, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
              "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "tie_word_embeddings": True,
              "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                               "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
LLAMA32_3B = {**LLAMA32_1B, "hidden_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 24,
              "head_dim": 128}
LLAMA31_70B = make_sparse_checkpoint.LLAMA_31_70B
LLAMA2_7B = {"architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
             "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008,
             "max_position_embeddings": 4096, "model_type": "llama", "num_attention_heads": 32,
             "num_hidden_layers": 32, "num_key_value_heads": 32, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
             "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float16", "vocab_size": 32000}
SMOLLM2_135M = {"architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
                "hidden_size": 576, "intermediate_size": 1536, "max_position_embeddings": 8192,
                "model_type": "llama", "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3,
                "rms_norm_eps": 1e-05, "rope_theta": 100000, "tie_word_embeddings": True, "vocab_size": 49152}

VARIANTS = [
    (LLAMA3, ["meta-llama/Meta-Llama-3-8B"], MetaLlama("3", "8B"), 8_030_261_248),
    (LLAMA_31_8B_INSTRUCT, ["meta-llama/Llama-3.1-8B-Instruct"], MetaLlama("3.1", "8B"), 8_030_261_248),
    (LLAMA32_1B, ["Llama-3.2-1B-Instruct"], MetaLlama("3.2", "1B"), 1_235_814_400),
    (LLAMA32_3B, ["Llama-3.2-3B"], MetaLlama("3.2", "3B"), 3_212_749_824),
    (LLAMA31_70B, ["meta-llama/Llama-3.1-70B-Instruct"], MetaLlama("3.1", "70B"), 70_553_706_496),
    (LLAMA31_70B, ["meta-llama/Llama-3.3-70B-Instruct"], MetaLlama("3.3", "70B"), 70_553_706_496),
    (LLAMA2_7B, ["meta-llama/Llama-2-7b-hf"], MetaLlama("2", "7B"), 6_738_415_616),
    (TINYLLAMA_CHAT, ["some-folder"], TinyLlama("1.1B"), 1_100_048_384),
    (TINYLLAMA_CHAT, ["TinyLlama/TinyLlama-1.1B-Chat-v1.0"], TinyLlama("1.1B"), 1_100_048_384),
    (LLAMA_31_8B_INSTRUCT, ["deepseek-ai/DeepSeek-R1-Distill-Llama-8B"], Distilled("Llama-3.1-8B", "DeepSeek"),
     8_030_261_248),
    (SMOLLM2_135M, ["HuggingFaceTB/SmolLM2-135M-Instruct"], Custom("HuggingFaceTB/SmolLM2-135M-Instruct"),
     134_515_008),
]


@pytest.mark.parametrize("config,names,variant,params", VARIANTS, ids=lambda x: x.__repr__()[:40])
def test_variant_and_parameter_count(config, names, variant, params):
    c = LlamaConfig.from_dict(config)
    assert parameter_count(c) == params
    assert detect_variant(c, names) == variant


def test_fixtures_and_smollm2_analyse_from_headers(tmp_path):
    for name in FIXTURE_NAMES:
        d = ModelDiagnostic.analyze_directory(FIXTURES / name)
        assert d.weight_info.parameter_count == parameter_count(d.config)
        assert not d.problems and d.verdict.startswith("loads and runs on numpy")
        assert isinstance(d.model_type, Custom)
    sharded = ModelDiagnostic.analyze_directory(FIXTURES / "sharded")
    assert len(sharded.weight_info.files) == 2
    assert sharded.weight_info.dtype_histogram == {"F32": len(sharded.weight_info.tensors)}
    bf16 = ModelDiagnostic.analyze_directory(FIXTURES / "llama32")
    assert bf16.memory_requirements.model_weights == 2 * bf16.weight_info.total_bytes  # bf16 -> float32


def test_smollm2_gguf_diagnostic():
    from refllama.errors import CheckpointError
    from refllama.formats.default_model import default_model_path

    try:
        path = default_model_path()
    except CheckpointError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(e))
    d = ModelDiagnostic.analyze_directory(path)
    assert d.weight_info.parameter_count == parameter_count(d.config) == 134_515_008
    assert d.weight_info.dtype_histogram == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    assert len(d.weight_info.quantized) == 211
    assert d.tokenizer_info.type == "GGUF-embedded" and d.tokenizer_info.vocab_size == 49152
    assert d.tokenizer_info.has_chat_template and d.tokenizer_info.eos_token_id == 2
    assert d.memory_requirements.model_weights == 134_515_008 * 4


def _bytes_read() -> int:
    return int(open("/proc/self/io").read().split("rchar:")[1].split()[0])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts reads in /proc/self/io (Linux only)")
def test_sparse_70b_folder_analyses_fast_from_headers(tmp_path):
    folder = make_sparse_checkpoint.write(tmp_path / "llama-3.1-70b")
    assert len(list(folder.glob("*.safetensors"))) == 30
    start, read = time.perf_counter(), _bytes_read()
    d = ModelDiagnostic.analyze_directory(folder, context_length=8192, memory_limit=parse_bytes("16GB"))
    elapsed, read = time.perf_counter() - start, _bytes_read() - read
    assert elapsed < 2.0 and read < 50e6, (elapsed, read)
    assert d.model_type == MetaLlama("3.1", "70B")
    assert d.weight_info.parameter_count == 70_553_706_496
    assert d.weight_info.total_bytes == 2 * 70_553_706_496 and len(d.weight_info.files) == 30
    m = d.memory_requirements
    assert m.model_weights == 4 * 70_553_706_496  # bf16 converted to float32 by the numpy backend
    assert m.kv_cache == 2 * 80 * 8 * 8192 * 128 * 4
    assert m.recommendations == [UseModelSharding(-(-m.total_estimated // parse_bytes("16GB")))]
    assert d.verdict.startswith("does not fit the memory limit")


def test_recommendations_carry_the_figures_that_fit():
    d = ModelDiagnostic.analyze_directory(FIXTURES / "sharded")
    c, w = d.config, d.weight_info
    full = estimate(c, w, context_length=128, batch_size=8)
    limit = full.total_estimated - 1
    recs = estimate(c, w, context_length=128, batch_size=8, memory_limit=limit).recommendations
    kinds = {type(r): r for r in recs}
    assert set(kinds) >= {ReduceKVCacheSize, ReduceBatchSize, UseModelSharding}
    # each figure fits, and one step more would not
    ctx = kinds[ReduceKVCacheSize].context_length
    assert estimate(c, w, context_length=ctx, batch_size=8).total_estimated <= limit
    assert estimate(c, w, context_length=ctx + 1, batch_size=8).total_estimated > limit
    b = kinds[ReduceBatchSize].batch_size
    assert estimate(c, w, context_length=128, batch_size=b).total_estimated <= limit
    # a limit that only quantized weights meet
    weights_only = estimate(c, w, context_length=8).total_estimated
    recs = estimate(c, w, context_length=8, memory_limit=int(weights_only * 0.5)).recommendations
    quantize = [r for r in recs if isinstance(r, QuantizeToDataType)]
    assert quantize and quantize[0].total_bytes <= weights_only * 0.5


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads peak RSS from /proc (Linux only)")
@pytest.mark.parametrize("name", [*FIXTURE_NAMES, "smollm2"])
def test_estimate_holds_when_measured(name):
    """Peak RSS growth of load + generate within 15% of the estimate (tools/measure_memory.py)."""
    models = measure_memory.models()
    if name not in models:
        if os.environ.get("CI"):
            raise AssertionError("SmolLM2 must be installed in CI")
        pytest.skip("SmolLM2 not installed")
    result = measure_memory.measure(models[name], batch=1 if name == "smollm2" else 32)
    assert 0.85 <= result["ratio"] <= 1.15, result


def test_memory_limit_is_enforced_before_loading():
    d = ModelDiagnostic.analyze_directory(FIXTURES / "tinyllama")
    config = BackendConfig().with_memory_limit(100_000).with_context_length(128).with_precision(DataType.F32)
    with pytest.raises(MemoryLimitError) as info:
        refllama.GenericLlamaEngine.from_diagnostic(d, config)
    assert info.value.recommendations and "limit is 100.0 KB" in str(info.value)
    engine = refllama.GenericLlamaEngine.from_diagnostic(d, config.with_memory_limit("64MB"))
    assert engine.memory_manager.allocated_memory > 0
    assert engine.generate_ids([1, 2, 3], 2)
    f64 = estimate(d.config, d.weight_info, dtype=DataType.F64, context_length=128)
    assert f64.model_weights == 2 * estimate(d.config, d.weight_info, context_length=128).model_weights


def test_verify_finds_nonfinite_values_and_checksum_mismatches(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(FIXTURES / "gelu", folder)
    report = verify(folder)
    assert report.ok and report.checked_tensors == 21 and report.manifest is None
    from refllama.diagnostics.diagnostic import _sha256

    (folder / "SHA256SUMS").write_text(f"{_sha256(folder / 'model.safetensors')}  model.safetensors\n")
    assert verify(folder).checksums == {"model.safetensors": "ok"}
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.norm.weight"] = tensors["model.norm.weight"].copy()
    tensors["model.norm.weight"][:3] = [np.nan, np.inf, -np.inf]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    report = verify(folder)
    assert not report.ok and report.nonfinite == {"model.norm.weight": 3}
    assert report.checksums == {"model.safetensors": "MISMATCH"}


def test_inspect_command(tmp_path):
    folder = make_sparse_checkpoint.write(tmp_path / "sparse")

    def run(*args):
        return subprocess.run([sys.executable, "-m", "refllama", "inspect", *args], capture_output=True, text=True,
                              timeout=120)

    r = run(str(folder), "--json", "--context", "8192", "--memory-limit", "16GB")
    assert r.returncode == 1  # does not fit
    report = json.loads(r.stdout)
    assert report["schema_version"] == 1
    assert report["model_type"] == {"kind": "MetaLlama", "version": "3.1", "size": "70B"}
    assert report["weights"]["parameter_count"] == 70_553_706_496 and len(report["weights"]["files"]) == 30
    assert report["memory"]["recommendations"][0]["kind"] == "UseModelSharding"
    assert set(report) == {"schema_version", "model_path", "model_type", "config", "weights", "tokenizer",
                           "quantization", "supported_dtypes", "memory", "backends", "problems", "memory_limit",
                           "verdict"}
    r = run(str(FIXTURES / "bias"), "--verify")
    assert r.returncode == 0, r.stderr
    assert "verdict: loads and runs on numpy" in r.stdout and "verification: ok" in r.stdout
    assert "model weights" in r.stdout and "F32" in r.stdout


def test_backend_config_names_do_what_they_say(monkeypatch):
    """with_quantization_support(False) dequantizes at load; with_batch_size(n) is the batch the memory check
    assumes and the most rows one generate call runs together; an unknown backend name is refused."""
    from refllama.errors import BackendError
    from refllama.formats.checkpoint import quantized_linears
    from refllama.generation import GenerationRequest, decode
    from refllama.loading import admit

    folder = FIXTURES / "quant" / "tiny-gptq-w4g32"
    d = ModelDiagnostic.analyze_directory(folder)
    quantized = refllama.GenericLlamaEngine.from_diagnostic(d)
    floats = refllama.GenericLlamaEngine.from_diagnostic(d, BackendConfig().with_quantization_support(False))
    assert quantized_linears(quantized.model.weights) and not quantized_linears(floats.model.weights)
    ids = [1, 5, 9, 13]
    np.testing.assert_array_equal(floats.logits(ids), refllama.load(folder, dequantize=True).logits(ids))

    one = estimate(d.config, d.weight_info, context_length=64)
    two = BackendConfig().with_batch_size(2).with_context_length(64)
    assert admit(d, two).allocated_memory > one.total_estimated
    engine = refllama.GenericLlamaEngine.from_diagnostic(d, two)
    batches = []
    run = decode.run
    monkeypatch.setattr(decode, "run", lambda model, requests: batches.append(len(requests)) or run(model, requests))
    requests = [GenerationRequest(token_ids=[1, 2 + i], max_new_tokens=2) for i in range(3)]
    responses = engine.generate(requests)
    assert batches == [2, 1] and len(responses) == 3
    assert [r.token_ids for r in responses] == [engine.generate(r).token_ids for r in requests]
    with pytest.raises(BackendError, match="nmba"):
        BackendConfig(backend="nmba")
