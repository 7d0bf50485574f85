"""Generation: HF-identical sampling processors and chat templates, stopping, streaming, logprobs and batches."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refllama import GenerationRequest
from refllama.errors import InputError
from refllama.generation.chat import render_chat_template
from refllama.generation.sampling import SamplingParams, process, sample

from conftest import FIXTURE_NAMES, GOLDEN, smollm2_engine

SAMPLING = json.loads((GOLDEN / "manifest.json").read_text())["sampling"]["cases"]


@pytest.fixture(scope="module")
def sampling_golden():
    with np.load(GOLDEN / "sampling.npz") as g:
        return {k: g[k] for k in g.files}


@pytest.mark.parametrize("case", sorted(SAMPLING))
def test_processors_equal_transformers(sampling_golden, case):
    """Same kept set (-inf in the same places) and the same processed scores, to 1e-6."""
    params = SamplingParams(**{"temperature": 1.0, **SAMPLING[case]})
    expected = sampling_golden[case]
    for row, scores in enumerate(sampling_golden["scores"]):
        ours = process(scores, params, previous=sampling_golden["previous"][row])
        np.testing.assert_array_equal(np.isinf(ours), np.isinf(expected[row]))
        finite = np.isfinite(ours)
        np.testing.assert_allclose(ours[finite], expected[row][finite], rtol=0, atol=1e-6)


def test_processor_order_is_hfs(sampling_golden):
    assert sampling_golden["combined_processors"].tolist() == [
        "RepetitionPenaltyLogitsProcessor", "TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper",
        "MinPLogitsWarper"]


def test_sampling_draws_follow_the_distribution():
    rng = np.random.default_rng(0)
    scores = np.log(np.array([0.5, 0.3, 0.2, 0.0 + 1e-30]))
    draws = np.bincount([sample(scores, SamplingParams(temperature=1.0), rng) for _ in range(4000)], minlength=4)
    np.testing.assert_allclose(draws / 4000, [0.5, 0.3, 0.2, 0.0], atol=0.03)
    assert sample(scores, SamplingParams(temperature=0.0), rng) == 0
    with pytest.raises(InputError, match="top_p"):
        SamplingParams(top_p=0)


# --- chat templates --------------------------------------------------------------------------------------------

CHAT = json.loads((GOLDEN / "chat_templates.json").read_text())


@pytest.mark.parametrize("key", sorted(CHAT["rendered"]))
def test_chat_template_renders_like_transformers(key):
    template_name, case, gen, tools = key.split("/")
    template = CHAT[f"{template_name}_template"]
    bos, eos = ("<|begin_of_text|>", "<|eot_id|>") if template_name == "llama31_style" else ("<|im_start|>",
                                                                                          "<|im_end|>")
    rendered = render_chat_template(template, CHAT["cases"][case], add_generation_prompt=gen == "gen=True",
                                    tools=CHAT["tools"] if tools == "tools=True" else None,
                                    bos_token=bos, eos_token=eos)
    assert rendered == CHAT["rendered"][key]


def test_chat_template_errors_and_sandbox():
    with pytest.raises(InputError, match="Unknown role: robot"):
        render_chat_template(CHAT["llama31_style_template"], [{"role": "robot", "content": "x"}])
    with pytest.raises(InputError, match="sandbox"):
        render_chat_template("{{ messages.__class__.__mro__[1].__subclasses__() }}", [{"role": "user"}])
    with pytest.raises(InputError, match="messages must be"):
        render_chat_template("{{ messages }}", ["hello"])


# --- the decode loop on tiny fixtures (token ids) --------------------------------------------------------------

def test_stop_reasons(engines):
    engine = engines("head_dim")  # its greedy continuation of this prompt ends with eos id 2 (golden)
    prompt = [int(t) for t in np.load(GOLDEN / "head_dim.npz")["ids_10"]]
    r = engine.generate(GenerationRequest(token_ids=prompt, max_new_tokens=16))
    assert r.finish_reason == "eos" and r.token_ids[-1] == 2 and r.text == ""
    r = engine.generate(GenerationRequest(token_ids=prompt, max_new_tokens=1))
    assert r.finish_reason == "length" and len(r.token_ids) == 1
    first = r.token_ids[0]
    r = engine.generate(GenerationRequest(token_ids=prompt, max_new_tokens=16, stop_token_ids=[first]))
    assert r.finish_reason == "stop" and r.token_ids == [first]
    r = engine.generate(GenerationRequest(token_ids=prompt, max_new_tokens=0))
    assert r.finish_reason == "length" and r.token_ids == []


def test_context_limit_is_a_clean_finish(engines):
    engine = engines("dynamic")  # max_position_embeddings 32
    r = engine.generate(GenerationRequest(token_ids=list(range(30)), max_new_tokens=50))
    assert r.finish_reason == "length" and len(r.token_ids) == 2
    with pytest.raises(InputError, match="the prompt has 33 tokens; the model's context is 32"):
        engine.generate(GenerationRequest(token_ids=[1] * 33))


def test_requests_are_validated(engines):
    engine = engines("tinyllama")
    with pytest.raises(InputError, match="exactly one of prompt, messages or token_ids"):
        engine.generate(GenerationRequest())
    with pytest.raises(InputError, match="no tokenizer"):
        engine.generate(GenerationRequest(prompt="hello"))
    with pytest.raises(InputError, match="token id 99"):
        engine.generate(GenerationRequest(token_ids=[1, 99]))
    with pytest.raises(InputError, match="temperature"):
        engine.generate(GenerationRequest(token_ids=[1], temperature=-1))


def test_logprobs_and_echo_match_the_logits(engines):
    engine = engines("bias", "float64")
    r = engine.generate(GenerationRequest(token_ids=[3, 1, 4, 1, 5], max_new_tokens=4, logprobs=3, echo=True))
    full = engine.logits([3, 1, 4, 1, 5, *r.token_ids])
    lp = full - np.log(np.exp(full - full.max(-1, keepdims=True)).sum(-1, keepdims=True)) - full.max(-1, keepdims=True)
    for i, token in enumerate(r.logprobs):
        assert token.token_id == r.token_ids[i]
        np.testing.assert_allclose(token.logprob, lp[4 + i, token.token_id], atol=1e-12)
        assert [t for t, _ in token.top] == list(np.argsort(-lp[4 + i], kind="stable")[:3])
        assert token.top[0][0] == token.token_id  # greedy picks the most likely
    assert r.prompt_logprobs[0] is None
    for t in range(1, 5):
        np.testing.assert_allclose(r.prompt_logprobs[t].logprob, lp[t - 1, [3, 1, 4, 1, 5][t]], atol=1e-12)


def test_seeded_sampling_is_reproducible(engines):
    engine = engines("mha_linear")
    request = GenerationRequest(token_ids=[5, 6, 7], max_new_tokens=12, temperature=0.9, top_p=0.95, seed=7)
    a, b = engine.generate(request), engine.generate(request)
    assert a.token_ids == b.token_ids
    others = {tuple(engine.generate(GenerationRequest(token_ids=[5, 6, 7], max_new_tokens=12, temperature=0.9,
                                                       top_p=0.95, seed=s)).token_ids) for s in range(5)}
    assert len(others) > 1  # the seed matters
    # ... and the float64 engine (a different backend numerically) draws the same tokens from the same seed
    assert engines("mha_linear", "float64").generate(request).token_ids == a.token_ids


@st.composite
def batches(draw):
    name = draw(st.sampled_from(FIXTURE_NAMES))
    size = draw(st.integers(1, 3))
    requests = []
    for _ in range(size):
        n = draw(st.integers(1, 9))
        sampled = draw(st.booleans())
        requests.append(GenerationRequest(
            token_ids=draw(st.lists(st.integers(0, 63), min_size=n, max_size=n)),
            max_new_tokens=draw(st.integers(0, 6)), temperature=0.8 if sampled else 0.0,
            top_k=draw(st.sampled_from([None, 10])), seed=draw(st.integers(0, 1000)), logprobs=2,
            echo=draw(st.booleans())))  # without echo the prefill computes the last position's logits only
    return name, requests


@given(batches())
def test_a_batch_row_equals_the_request_alone(engines, case):
    """Left padding, masks and per-row positions: every row computes what it would alone (float64)."""
    name, requests = case
    engine = engines(name, "float64")
    together = engine.generate(requests)
    for request, row in zip(requests, together, strict=True):
        alone = engine.generate(request)
        assert row.token_ids == alone.token_ids and row.finish_reason == alone.finish_reason
        for a, b in zip(row.logprobs, alone.logprobs, strict=True):
            assert abs(a.logprob - b.logprob) < 1e-10
        if request.echo:
            for a, b in zip(row.prompt_logprobs[1:], alone.prompt_logprobs[1:], strict=True):
                assert abs(a.logprob - b.logprob) < 1e-10


# --- the real model: text, chat, stop strings, streaming -------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2():
    return smollm2_engine()


def test_chat_request_uses_the_template_without_a_double_bos(smollm2):
    with np.load(GOLDEN / "smollm2.npz") as g:
        golden_ids, golden_greedy = g["chat_ids"].tolist(), g["chat_greedy_f32"].tolist()
    messages = json.loads((GOLDEN / "manifest.json").read_text())["smollm2"]["prompts"]["chat"]
    r = smollm2.generate(GenerationRequest(messages=messages, max_new_tokens=32))
    assert r.prompt_token_ids == golden_ids
    assert r.token_ids == golden_greedy and r.finish_reason == "eos"
    assert r.text == "The capital of France is Paris."


def test_stop_strings_split_across_tokens_are_trimmed(smollm2):
    full = smollm2.generate(GenerationRequest(prompt="The capital of France is", max_new_tokens=8))
    assert full.text == " Paris.\n\nThe answer is:"
    r = smollm2.generate(GenerationRequest(prompt="The capital of France is", max_new_tokens=8,
                                           stop=["s.\n\nThe"]))  # spans "Paris", ".", "\n", "\n", "The"
    assert r.finish_reason == "stop" and r.text == " Pari"
    assert r.token_ids == full.token_ids[:5]  # generation stops at the token that completed the stop string


def test_streaming_concatenates_to_the_text_without_broken_utf8(smollm2):
    with np.load(GOLDEN / "smollm2.npz") as g:
        ids = g["unicode_ids"].tolist()  # greedy continues with emoji that span several tokens
    request = GenerationRequest(token_ids=ids, max_new_tokens=12)
    pieces = list(smollm2.stream(request))
    final = smollm2.generate(request)
    assert "".join(pieces) == final.text and "👍" in final.text
    assert not any("\ufffd" in p for p in pieces)
    assert len(pieces) > 1
    stopped = GenerationRequest(prompt="The capital of France is", max_new_tokens=8, stop=["\n\nThe"])
    pieces = list(smollm2.stream(stopped))
    assert "".join(pieces) == smollm2.generate(stopped).text == " Paris."
