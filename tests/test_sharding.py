"""Pipeline sharding in one process: every split of every fixture is bit-identical to the unsharded engine.

Splitting by layers changes no arithmetic, so every comparison here is `np.array_equal`, never a tolerance:
logits, traces, cached decoding, padded batches, greedy and sampled generation, streaming. The stage plan (bytes
per stage, "auto" against a per-node limit) and stage loading (only a stage's own tensors and shard files) are
checked too. Ray stages: tests/test_sharding_ray.py. About 65 s on a 2-core VM shared with other jobs, 45 s of it
the SmolLM2 comparison (three loads of a 135M model).
"""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from safetensors.numpy import save_file

import refllama
from refllama import GenerationRequest
from refllama.diagnostics.diagnostic import ModelDiagnostic
from refllama.diagnostics.memory import BackendConfig, MemoryLimitError, UseModelSharding, estimate, stage_plan
from refllama.dtypes import DataType
from refllama.errors import CheckpointError, InputError
from refllama.model.weights import StageSpan
from refllama.sharding.plan import balance, check_bounds, spans
from refllama.sharding.stages import Stage

from conftest import FIXTURE_NAMES, FIXTURES, ROOT, decode_rows, smollm2_path
from test_cupy_emulated import emulated  # noqa: F401 - a fixture: the cupy backend over CuPy's CPU stand-in
from test_cupy_emulated import engine as cupy_engine

sys.path.insert(0, str(ROOT / "tools"))
import make_sparse_checkpoint
from make_fixtures import _BASE, make_weights

DTYPES = ("float32", "float64")
DEEP = {**_BASE, "num_hidden_layers": 7, "tie_word_embeddings": True}  # enough layers for many splits


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A 7-layer random model with tied embeddings (both ends of the pipeline hold the table)."""
    folder = tmp_path_factory.mktemp("deep")
    (folder / "config.json").write_text(json.dumps(DEEP))
    weights = make_weights(DEEP, seed=3)
    weights.pop("lm_head.weight", None)
    save_file(weights, str(folder / "model.safetensors"))
    return folder


def every_split(layers: int) -> list[list[int]]:
    """Every way to cut `layers` layers into contiguous stages (2^(layers-1) of them)."""
    out = []
    for mask in range(2 ** (layers - 1)):
        cuts = [i + 1 for i in range(layers - 1) if mask >> i & 1]
        out.append([0, *cuts, layers])
    return out


def same_outputs(a: refllama.GenericLlamaEngine, b: refllama.GenericLlamaEngine, vocab: int) -> None:
    """Logits (one pass and prefill + cached decode), trace, greedy ids and a padded sampled batch: identical."""
    ids = (np.arange(3, 3 + 11) * 7) % vocab
    assert np.array_equal(a.logits(ids), b.logits(ids))
    assert np.array_equal(decode_rows(a, ids, 4), decode_rows(b, ids, 4))
    ta, tb = a.trace(ids), b.trace(ids)
    assert list(ta) == list(tb)  # the same names, in the same order
    assert all(np.array_equal(ta[k], tb[k]) for k in ta)
    assert a.generate_ids(ids[:5], 8, stop_at_eos=False) == b.generate_ids(ids[:5], 8, stop_at_eos=False)
    batch = [GenerationRequest(token_ids=[int(t) for t in ids[:n]], max_new_tokens=6, temperature=0.8, seed=n,
                               logprobs=2) for n in (2, 7, 4)]
    for ra, rb in zip(a.generate(batch), b.generate(batch), strict=True):
        assert ra.token_ids == rb.token_ids
        assert [x.logprob for x in ra.logprobs] == [x.logprob for x in rb.logprobs]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_every_split_of_every_fixture_is_identical(name, dtype, engines):
    whole = engines(name, dtype)
    for bounds in every_split(whole.config.num_hidden_layers):
        sharded = refllama.load(FIXTURES / name, dtype=dtype, shards=bounds)
        assert sharded.pipeline.plan.bounds == tuple(bounds)
        same_outputs(whole, sharded, whole.config.vocab_size)


@pytest.mark.parametrize("dtype", DTYPES)
def test_deep_model_one_layer_per_stage_and_balanced_splits(deep, dtype):
    whole = refllama.load(deep, dtype=dtype)
    for shards in (7, 3, [0, 1, 7], [0, 6, 7]):
        same_outputs(whole, refllama.load(deep, dtype=dtype, shards=shards), DEEP["vocab_size"])


@given(cuts=st.sets(st.integers(1, 6), max_size=6), prefill=st.integers(1, 9), dtype=st.sampled_from(DTYPES))
def test_property_any_split_points_give_identical_cached_decoding(deep, cuts, prefill, dtype):
    whole = _deep_engine(deep, dtype)
    bounds = [0, *sorted(cuts), 7]
    sharded = refllama.load(deep, dtype=dtype, shards=bounds)
    ids = (np.arange(10) * 5 + prefill) % DEEP["vocab_size"]
    assert np.array_equal(decode_rows(whole, ids, prefill), decode_rows(sharded, ids, prefill))


_DEEP_ENGINES: dict = {}


def _deep_engine(folder, dtype):
    if dtype not in _DEEP_ENGINES:
        _DEEP_ENGINES[dtype] = refllama.load(folder, dtype=dtype)
    return _DEEP_ENGINES[dtype]


@pytest.mark.parametrize(("backend", "dtype"), [("numba", "float32"), ("mlx", "float32"), ("mlx", "bfloat16")])
def test_other_backends_hand_their_own_arrays_on(backend, dtype):
    """A stage passes its backend's array (an MLX bfloat16 array, say) to the next as it is: identical."""
    pytest.importorskip({"numba": "numba", "mlx": "mlx.core"}[backend])
    for name in ("llama32", "bias"):
        whole = refllama.load(FIXTURES / name, backend=backend, dtype=dtype)
        sharded = refllama.load(FIXTURES / name, backend=backend, dtype=dtype, shards=2)
        ids = np.arange(1, 15)
        assert np.array_equal(whole.logits(ids), sharded.logits(ids))
        assert whole.generate_ids(ids[:4], 8, stop_at_eos=False) == sharded.generate_ids(ids[:4], 8, stop_at_eos=False)


def test_streaming_and_padded_forward_are_identical(deep):
    whole, sharded = refllama.load(deep), refllama.load(deep, shards=3)
    request = GenerationRequest(token_ids=[5, 9, 11], max_new_tokens=7, temperature=0.0)
    assert whole.generate(request).token_ids == sharded.generate(request).token_ids
    ids = np.array([[0, 0, 4, 5, 6], [7, 8, 9, 10, 11]])
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    positions = np.array([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])
    ca, cb = whole.new_cache(2, 8), sharded.new_cache(2, 8)
    assert np.array_equal(whole.forward(ids, ca, mask, positions), sharded.forward(ids, cb, mask, positions))
    mask = np.concatenate([mask, np.ones((2, 1), dtype=mask.dtype)], axis=1)
    step = np.array([[3], [4]])
    assert np.array_equal(whole.forward(step, ca, mask, positions[:, -1:] + 1),
                          sharded.forward(step, cb, mask, positions[:, -1:] + 1))
    assert cb.length == ca.length == 6


def test_smollm2_split_in_two_and_three_is_identical():
    path = smollm2_path()
    whole = refllama.load(path)
    ids = whole.tokenizer.encode("The capital of France is")
    reference, greedy = whole.logits(ids), whole.generate_ids(ids, 3)
    for shards in (2, 3):
        sharded = refllama.load(path, shards=shards)
        assert sharded.tokenizer is not None and sharded.pipeline.plan.num_stages == shards
        assert np.array_equal(sharded.logits(ids), reference)
        if shards == 3:
            assert sharded.generate_ids(ids, 3) == greedy


# --- the stage plan --------------------------------------------------------------------------------------------

def test_balance_minimises_the_largest_stage():
    assert balance([1] * 8, 0, 0, 4) == (0, 2, 4, 6, 8)
    assert balance([1] * 9, 3, 0, 3) == (0, 1, 5, 9)  # the embedding table weighs like 3 layers
    assert balance([1] * 9, 0, 3, 3) == (0, 4, 8, 9)
    assert balance([5, 1, 1, 1, 1, 5], 0, 0, 3) == (0, 1, 5, 6)
    assert balance([1, 2, 3], 0, 0, 3) == (0, 1, 2, 3)
    with pytest.raises(InputError, match="3 layers into 4 stages"):
        balance([1, 1, 1], 0, 0, 4)


@given(costs=st.lists(st.integers(0, 50), min_size=1, max_size=9), extra=st.tuples(st.integers(0, 80),
                                                                                  st.integers(0, 80)),
       data=st.data())
def test_property_balance_is_optimal(costs, extra, data):
    n = data.draw(st.integers(1, len(costs)))

    def largest(bounds):
        return max(sum(costs[s.first:s.last]) + (extra[0] if s.embeds else 0) + (extra[1] if s.head else 0)
                   for s in spans(bounds))

    bounds = balance(costs, *extra, n)
    assert check_bounds(bounds, len(costs)) == bounds and len(bounds) == n + 1
    assert largest(bounds) == min(largest(b) for b in every_split(len(costs)) if len(b) == n + 1)


@pytest.mark.parametrize("bad", [[0, 2], [1, 7], [0, 3, 3, 7], [0, 5, 2, 7], [0]])
def test_bad_split_points_name_the_rule(deep, bad):
    with pytest.raises(InputError, match="rise strictly from 0"):
        refllama.load(deep, shards=bad)


def test_stage_plan_counts_each_stage_share(deep):
    info = ModelDiagnostic.analyze_directory(deep).weight_info
    config = ModelDiagnostic.analyze_directory(deep).config
    plan = stage_plan(config, info, [0, 2, 7], dtype=DataType.F64, context_length=16)
    s = 8  # float64
    H, V, inter = DEEP["hidden_size"], DEEP["vocab_size"], DEEP["intermediate_size"]
    per_layer = s * (2 * H + 3 * H * H + 3 * H * inter)  # norms, q/o (H x H) and k/v (H/2 x H), gate/up/down
    assert plan.weight_bytes == (s * V * H + 2 * per_layer, 5 * per_layer + s * H + s * V * H)  # tied: both ends
    kv_layer = 2 * 16 * 2 * 16 * s  # keys and values: kv heads 2, context 16, head_dim 16
    assert all(m > w + kv_layer * (span.last - span.first)
               for m, w, span in zip(plan.memory_bytes, plan.weight_bytes, plan.spans, strict=True))


def test_auto_plan_fits_a_per_node_limit_on_the_sparse_70b(tmp_path):
    folder = make_sparse_checkpoint.write(tmp_path / "llama-3.1-70b")
    d = ModelDiagnostic.analyze_directory(folder, dtype="float64", context_length=8192)
    limit = 128 * 10**9
    plan = stage_plan(d.config, d.weight_info, "auto", dtype=DataType.F64, context_length=8192, memory_limit=limit)
    assert max(plan.memory_bytes) <= limit
    # 565 GB of float64 weights (6.9 GB a layer) and, per stage, the 34 GB attention scores of an 8192-token
    # prefill and 2.1 GB of KV cache a layer: 7 stages of 10-12 layers
    assert plan.bounds[-1] == 80 and plan.num_stages == 7
    fewer = stage_plan(d.config, d.weight_info, plan.num_stages - 1, dtype=DataType.F64, context_length=8192)
    assert max(fewer.memory_bytes) > limit
    req = estimate(d.config, d.weight_info, dtype=DataType.F64, context_length=8192, memory_limit=limit)
    sharding = [r for r in req.recommendations if isinstance(r, UseModelSharding)]
    assert sharding and sharding[0].plan == plan


def test_from_diagnostic_with_model_sharding(deep):
    d = ModelDiagnostic.analyze_directory(deep)
    engine = refllama.GenericLlamaEngine.from_diagnostic(d, BackendConfig().with_model_sharding(3))
    assert engine.pipeline.plan.num_stages == 3
    whole = refllama.load(deep)
    assert np.array_equal(engine.logits([1, 2, 3]), whole.logits([1, 2, 3]))
    with pytest.raises(MemoryLimitError, match="shard the model over"):
        refllama.GenericLlamaEngine.from_diagnostic(d, BackendConfig().with_model_sharding(2).with_memory_limit(
            "200KB").with_context_length(16))


# --- a stage reads only its own tensors ------------------------------------------------------------------------

def test_stage_holds_only_its_span(deep):
    stage = Stage.load(deep, StageSpan(2, 4, embeds=False, head=False), "numpy", "float32")
    w = stage.model.weights
    assert w.embeddings is None and w.final_norm is None
    assert [i for i, layer in enumerate(w.layers) if layer is not None] == [2, 3]


def test_a_stage_needs_only_its_shard_files(tmp_path):
    folder = shutil.copytree(FIXTURES / "sharded", tmp_path / "sharded")
    (folder / "model-00002-of-00002.safetensors").unlink()  # layer 1 and the final norm
    first = Stage.load(folder, StageSpan(0, 1, embeds=True, head=False), "numpy", "float32")
    assert first.model.weights.layers[0] is not None
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors"):
        Stage.load(folder, StageSpan(1, 2, embeds=False, head=True), "numpy", "float32")


def test_a_driver_without_weight_files_plans_from_the_config(tmp_path):
    """A Ray driver may hold only config.json and the index: it reads the config and plans from the shapes."""
    from refllama.loading import read_model
    from refllama.sharding.stages import plan_model

    for name in ("config.json", "model.safetensors.index.json"):
        shutil.copy(FIXTURES / "sharded" / name, tmp_path / name)
    files = read_model(tmp_path, None, span=StageSpan(0, 0, embeds=False, head=False))
    assert files.config.num_hidden_layers == 2 and files.tokenizer is None
    from_shapes = plan_model(tmp_path, files.config, 2, "numpy", DataType.F32)
    from_headers = plan_model(FIXTURES / "sharded", files.config, 2, "numpy", DataType.F32)
    assert from_shapes.bounds == from_headers.bounds == (0, 1, 2)
    assert from_shapes.weight_bytes == from_headers.weight_bytes  # float32 stored, float32 computed


def test_a_closed_engine_says_so(deep):
    engine = refllama.load(deep, shards=2)
    engine.close()
    with pytest.raises(InputError, match="closed"):
        engine.logits([1, 2])


def test_engine_without_pipeline_or_weights_is_refused():
    config = refllama.load(FIXTURES / "tinyllama").config
    with pytest.raises(InputError, match="weights and a backend"):
        refllama.GenericLlamaEngine(config, None, None)


def test_unknown_cluster_and_bad_devices_are_named(deep):
    with pytest.raises(InputError, match="'slurm'"):
        refllama.load(deep, shards=2, cluster="slurm")
    with pytest.raises(InputError, match="needs backend='cupy'"):
        refllama.load(deep, devices=["cuda:0", "cuda:1"])
    with pytest.raises(InputError, match="written 'cuda:0'"):
        refllama.load(deep, backend="cupy", devices=["gpu0", "gpu1"])
    with pytest.raises(InputError, match="2 devices for 3 stages"):
        refllama.load(deep, shards=3, devices=["cuda:0", "cuda:0"])


# --- the command line --------------------------------------------------------------------------------------------

def test_cli_logits_with_shards_equal_unsharded(deep, tmp_path):
    from refllama.cli import main

    assert main(["logits", str(deep), "--ids", "1,2,3,4", "--out", str(tmp_path / "whole.npy"), "--quiet"]) == 0
    assert main(["logits", str(deep), "--ids", "1,2,3,4", "--out", str(tmp_path / "split.npy"), "--quiet",
                 "--shards", "0,3,7"]) == 0
    assert np.array_equal(np.load(tmp_path / "whole.npy"), np.load(tmp_path / "split.npy"))


def test_cli_inspect_prints_the_auto_stage_plan(tmp_path, capsys):
    from refllama.cli import main

    folder = make_sparse_checkpoint.write(tmp_path / "llama-3.1-70b")
    args = ["inspect", str(folder), "--dtype", "float64", "--context", "8192", "--memory-limit", "128GB",
            "--shards", "auto"]
    assert main([*args, "--json"]) == 0  # every stage fits the limit per node
    plan = json.loads(capsys.readouterr().out)["stage_plan"]
    assert plan["bounds"][0] == 0 and plan["bounds"][-1] == 80 and len(plan["stages"]) == 7
    assert plan["stages"][0]["files"][0] == "model-00001-of-00030.safetensors"
    assert all(s["memory_bytes"] <= 128 * 10**9 for s in plan["stages"])
    assert main(args) == 0
    assert "the largest stage fits the limit of 128.0 GB per node" in capsys.readouterr().out
    assert main(["inspect", str(folder), "--dtype", "float64", "--memory-limit", "128GB", "--shards", "2"]) == 1


# --- stages on CUDA devices, with CuPy's CPU stand-in (tests/test_cupy_emulated.py) ------------------------------

@pytest.mark.parametrize("emulated", ["models"], indirect=True)
def test_devices_give_each_stage_a_cupy_backend_on_its_device(emulated, monkeypatch):  # noqa: F811
    """`devices=` builds each stage's cupy backend on its device and runs it under that device; with the one device
    the stand-in has, both stages share it and the logits are the unsharded cupy engine's. (No peer-to-peer copy
    happens here: that needs two GPUs.)"""
    from refllama.sharding import stages

    module, _ = emulated
    monkeypatch.setitem(sys.modules, "cupy", module.cp)
    made = []

    def backend_on(name, dtype, device):
        assert name == "cupy"
        made.append(module.CupyBackend(DataType.parse(dtype), device=device))
        return made[-1]

    monkeypatch.setattr(stages, "stage_backend", backend_on)
    whole = cupy_engine(emulated, FIXTURES / "llama32")
    sharded = refllama.load(FIXTURES / "llama32", backend="cupy", devices=["cuda:0", "cuda:0"])
    assert [b.device_id for b in made] == [0, 0] and [s.device for s in sharded.pipeline.stages] == [0, 0]
    ids = np.arange(3, 20)
    assert np.array_equal(whole.logits(ids), sharded.logits(ids))
    assert whole.generate_ids(ids[:5], 6) == sharded.generate_ids(ids[:5], 6)
