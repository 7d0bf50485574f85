"""Pipeline stages as Ray actors on one local cluster (num_cpus=2, started once for the module).

Every fixture, float32 and float64, split in two actors, and a 7-layer model in three: logits, traces, cached
decoding, padded batches and generation are `np.array_equal` to the unsharded engine. Faults: a stage killed
mid-generation or one that stops answering raises StageError naming the stage within the stated timeout, and after
`close()` no stage process is left. Each stage's peak RSS on SmolLM2 split in 2 and 3 is within 15% of its
predicted share. About 2.5 minutes on a 2-core VM shared with other jobs (the cluster starts in ~9 s, each
pipeline's actors in 4-8 s).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import refllama
from refllama import GenerationRequest
from refllama.diagnostics.diagnostic import ModelDiagnostic
from refllama.diagnostics.memory import stage_plan
from refllama.dtypes import DataType
from refllama.errors import InputError, StageError
from refllama.generation.decode import forward_steps

from conftest import FIXTURE_NAMES, FIXTURES, decode_rows, smollm2_path
from test_sharding import DEEP, deep, same_outputs  # noqa: F401 - `deep` is a fixture

if os.environ.get("CI"):
    import ray  # CI installs the dev extra, which brings Ray: these tests must run there
else:
    ray = pytest.importorskip("ray")

FAULT_TIMEOUT = 5.0  # seconds a stage may take for one call in the fault tests


@pytest.fixture(scope="module", autouse=True)
def local_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def ray_engine(path, **options) -> refllama.GenericLlamaEngine:
    return refllama.load(path, cluster="ray", **options)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_every_fixture_on_two_actors_is_identical(name, dtype, engines):
    whole = engines(name, dtype)
    with ray_engine(FIXTURES / name, dtype=dtype, shards=[0, 1, 2]) as sharded:
        same_outputs(whole, sharded, whole.config.vocab_size)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_three_actors_including_one_layer_stages(deep, dtype):  # noqa: F811
    whole = refllama.load(deep, dtype=dtype)
    with ray_engine(deep, dtype=dtype, shards=[0, 1, 6, 7]) as sharded:
        info = sharded.pipeline.info()
        assert len({i["pid"] for i in info}) == 3 and os.getpid() not in {i["pid"] for i in info}
        same_outputs(whole, sharded, DEEP["vocab_size"])
        ids = np.arange(2, 14) % DEEP["vocab_size"]
        assert np.array_equal(decode_rows(whole, ids, 1), decode_rows(sharded, ids, 1))
        text = GenerationRequest(token_ids=[3, 4, 5], max_new_tokens=5)
        assert whole.generate(text).token_ids == sharded.generate(text).token_ids
        with pytest.raises(InputError, match="KV cache full"):  # bad input is the caller's error, not a fault
            sharded.forward(np.ones((1, 4), dtype=np.int64), sharded.new_cache(1, 3))
        assert np.array_equal(whole.logits([7, 8]), sharded.logits([7, 8]))  # and the pipeline goes on


def test_mlx_bfloat16_stages_hand_host_bfloat16_on():
    pytest.importorskip("mlx.core")
    whole = refllama.load(FIXTURES / "llama32", backend="mlx", dtype="bfloat16")
    with ray_engine(FIXTURES / "llama32", backend="mlx", dtype="bfloat16", shards=2) as sharded:
        ids = np.arange(1, 15)
        assert np.array_equal(whole.logits(ids), sharded.logits(ids))


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _gone(pids: set[int], within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads process states from /proc (Linux only)")
def test_a_stage_killed_mid_generation_raises_stage_error_and_leaves_no_process(deep):  # noqa: F811
    engine = ray_engine(deep, shards=3, stage_timeout=FAULT_TIMEOUT)
    pids = {i["pid"] for i in engine.pipeline.info()}
    victim = engine.pipeline.info()[1]["pid"]
    steps = forward_steps(engine, np.array([[3, 4, 5]]), 40)  # the decode loop generation runs
    logits = next(steps)
    for _ in range(3):
        logits = steps.send(logits[:, -1].argmax(-1))
    os.kill(victim, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(StageError, match=r"pipeline stage 1 \(layers 2-4\)") as failure:
        steps.send(logits[:, -1].argmax(-1))
    assert time.monotonic() - start < FAULT_TIMEOUT
    assert failure.value.stage == 1 and failure.value.layers == range(2, 5)
    assert "ActorDiedError" in str(failure.value) and "\x1b" not in str(failure.value)
    with pytest.raises(StageError, match="earlier failure"):  # the engine refuses further work, at once
        engine.logits([1, 2])
    engine.close()
    assert _gone(pids)
    with pytest.raises(InputError, match="closed"):
        engine.new_cache(1, 4)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="stops a process with SIGSTOP (Linux only)")
def test_a_stage_that_stops_answering_times_out(deep):  # noqa: F811
    engine = ray_engine(deep, shards=2, stage_timeout=2.0)
    pids = {i["pid"] for i in engine.pipeline.info()}
    assert np.array_equal(engine.logits([1, 2, 3]), refllama.load(deep).logits([1, 2, 3]))
    last = engine.pipeline.info()[-1]["pid"]
    os.kill(last, signal.SIGSTOP)  # alive but silent: a hung stage
    start = time.monotonic()
    with pytest.raises(StageError, match=r"pipeline stage 1 \(layers \d-6\): did not answer within 2 s"):
        engine.logits([1, 2, 3])
    assert 2.0 <= time.monotonic() - start < 2.0 + 3.0
    engine.close()  # kills the stopped process too
    assert _gone(pids)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc (Linux only)")
@pytest.mark.parametrize("shards", [2, 3])
def test_smollm2_stage_peak_rss_is_its_predicted_share(shards):
    """Each actor's peak RSS growth over its process before loading, through a prefill and decoding, within 15%
    of the plan's prediction for that stage (its weights, its layers' KV cache, activations, load overhead)."""
    path = smollm2_path()
    prompt, new = 24, 8
    with ray_engine(path, shards=shards) as engine:
        engine.generate(GenerationRequest(token_ids=list(range(100, 100 + prompt)), max_new_tokens=new))
        info = engine.pipeline.info()
        bounds = engine.pipeline.plan.bounds
    d = ModelDiagnostic.analyze_directory(path)
    predicted = stage_plan(d.config, d.weight_info, bounds, dtype=DataType.F32, context_length=prompt + new)
    for stage, (i, mib) in enumerate(zip(info, predicted.memory_bytes, strict=True)):
        growth = i["peak_rss_mb"] - i["rss_before_load_mb"]
        assert 0.85 * mib / 2**20 < growth < 1.15 * mib / 2**20, (stage, growth, mib / 2**20)


def test_a_stage_is_pinned_to_the_node_that_declares_its_resource():
    from refllama.sharding.ray_stages import ACTOR_OPTIONS, stage_options

    cluster = {"CPU": 8.0, "refllama_stage_1": 1.0}
    assert stage_options(0, None, cluster) == ACTOR_OPTIONS
    assert stage_options(1, {"num_cpus": 4}, cluster) == {**ACTOR_OPTIONS, "num_cpus": 4,
                                                          "resources": {"refllama_stage_1": 1}}


def test_cli_logits_on_ray_equal_unsharded(tmp_path):
    from refllama.cli import main

    out = {}
    for name, extra in (("whole", []), ("ray", ["--shards", "2", "--cluster", "ray"])):
        assert main(["logits", str(FIXTURES / "llama32"), "--ids", "5,6,7", "--out", str(tmp_path / f"{name}.npy"),
                     "--quiet", *extra]) == 0
        out[name] = np.load(tmp_path / f"{name}.npy")
    assert np.array_equal(out["whole"], out["ray"])
