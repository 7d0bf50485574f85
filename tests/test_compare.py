"""The oracle toolkit: compare metrics and profiles, engine.trace, the trace format, `refllama trace` and
`refllama compare`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import refllama
from refllama.testing import (
    PROFILES,
    TraceFormatError,
    assert_logits_close,
    check,
    compare,
    compare_traces,
    load_trace,
    save_trace,
    validate_trace,
)
from refllama.testing.traces import TraceDims, expected_shapes

from conftest import FIXTURES


def test_metrics_on_known_differences():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4, 50))
    r = compare(ref, ref)
    assert r.max_abs_diff == 0 and r.nmse == 0 and r.kl_max == 0 and r.top1_agreement == 1
    shifted = compare(ref, ref + 3.0)  # a constant shift changes no probability
    assert shifted.max_abs_diff == pytest.approx(3.0) and shifted.kl_max < 1e-12 and shifted.top1_agreement == 1
    assert shifted.nmse == pytest.approx((9 * ref.size) / (ref**2).sum())
    # swap the top-2 tokens of row 0: top-1 disagrees, but each is in the other's top-5
    cand = ref.copy()
    a, b = np.argsort(-ref[0])[:2]
    cand[0, [a, b]] = ref[0, [b, a]]
    r = compare(ref, cand)
    assert r.top1_agreement == 0.75 and r.topk_containment == 1.0 and r.kl[0] > 0 and r.kl[1] == 0
    # the candidate's top-1 is far down the reference's list: not contained
    cand = ref.copy()
    cand[1, np.argmin(ref[1])] = 100.0
    assert compare(ref, cand).topk_containment == 0.75


def test_the_metrics_module_and_the_compare_function_have_different_names():
    """`refllama.testing.compare` is the function; the module is refllama.testing.comparison, so neither shadows
    the other (refllama.testing.compare.compare_traces used to raise AttributeError)."""
    import refllama.testing as testing
    from refllama.testing import comparison

    assert testing.compare is comparison.compare and callable(testing.compare)
    assert testing.compare_traces is comparison.compare_traces
    assert testing.expert_agreement is comparison.expert_agreement
    assert set(testing.__all__) <= set(dir(testing))


def test_profiles_document_their_calibration_and_catch_breaks():
    assert set(PROFILES) == {"f64", "f32", "bf16", "int8", "q4"}
    assert all(p.calibration for p in PROFILES.values())
    ref = np.random.default_rng(1).standard_normal((6, 32)) * 3
    assert_logits_close(ref, ref + 1e-5, "f32")
    # f32 allows 2e-4 + 1e-4 x max |ref| at each position
    bound = 2e-4 + 1e-4 * np.abs(ref).max(-1)
    assert not any("max |diff|" in f for f in check(compare(ref, ref + 0.9 * bound[:, None]), "f32"))
    with pytest.raises(AssertionError, match=rf"max \|diff\| 0.01 > {bound.min():.3g} at position "
                                             rf"{bound.argmin()} \(0.0002 \+ 0.0001 x max \|ref\|"):
        assert_logits_close(ref, ref + 1e-2, "f32")
    flipped = ref.copy()
    flipped[2] = -ref[2]
    assert any("top-1 agreement" in f for f in check(compare(ref, flipped), "bf16"))


def test_trace_names_shapes_and_consistency(engines):
    engine = engines("tinyllama", "float64")
    ids = [5, 1, 7, 2, 9]
    t = engine.trace(ids)
    c = engine.config
    assert list(t)[:3] == ["embeddings", "layers.0.input_norm", "layers.0.q"] and list(t)[-1] == "logits"
    assert len(t) == 3 + 9 * c.num_hidden_layers
    assert t["layers.0.q"].shape == (c.num_attention_heads, 5, c.head_dim)
    assert t["layers.1.v"].shape == (c.num_key_value_heads, 5, c.head_dim)
    np.testing.assert_array_equal(t["logits"], engine.logits(ids))
    np.testing.assert_allclose(t["layers.0.residual"], t["layers.0.residual_attention"] + t["layers.0.mlp_output"],
                               rtol=1e-15, atol=0)
    # float32 and float64 stay within the f32 profile at every tensor
    rows = compare_traces(t, engines("tinyllama", "float32").trace(ids), "f32")
    assert len(rows) == len(t) and all(r.ok for r in rows)


def _golden_extra() -> bool:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            raise
        return False
    return True


@pytest.mark.skipif(not _golden_extra(), reason="needs the [golden] extra (CI installs it)")
def test_hf_trace_matches_refllama_tensor_by_tensor(tmp_path):
    out = tmp_path / "hf.npz"
    trace = [sys.executable, "-m", "refllama", "trace", str(FIXTURES / "head_dim"), "--engine", "hf", "--ids",
             "3,1,4,1,5,9,2,6", "--out", str(out)]
    subprocess.run(trace, check=True, capture_output=True, timeout=300)
    hf, manifest = load_trace(out)
    assert manifest["engine"] == "transformers" and manifest["dtype"] == "float32"
    ours = refllama.load(FIXTURES / "head_dim").trace([3, 1, 4, 1, 5, 9, 2, 6])
    assert list(hf) == list(ours)
    rows = compare_traces(hf, ours, "f32")
    assert all(r.ok for r in rows), [r for r in rows if not r.ok]
    # stock HF float64 keeps RMSNorm in float32: against true float64 it diverges at the first norm
    subprocess.run([*trace, "--dtype", "float64"], check=True, timeout=300, capture_output=True)
    r = subprocess.run([sys.executable, "-m", "refllama", "compare", str(out), str(FIXTURES / "head_dim"),
                        "--ids", "3,1,4,1,5,9,2,6", "--dtype-b", "float64", "--profile", "f64", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    report = json.loads(r.stdout)
    assert report["first_divergence"] == "layers.0.input_norm"
    assert report["reference"].endswith(f"transformers {manifest['version']} (float64)")


def test_compare_command_table_json_and_plot(tmp_path):
    args = [sys.executable, "-m", "refllama", "compare", str(FIXTURES / "bias"), "--ids", "1,2,3,4,5"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "no tensor diverges beyond the 'f32' profile" in r.stdout and "layers.1.mlp_output" in r.stdout
    r = subprocess.run([*args, "--dtype-b", "float32", "--profile", "f64", "--json", "--plot",
                        str(tmp_path / "p.png")], capture_output=True, text=True, timeout=300)
    report = json.loads(r.stdout)
    # float32 vs float64 under the f64 profile: the embeddings are the same numbers, the first norm is not
    assert r.returncode == 1 and report["rows"][0]["name"] == "embeddings" and report["rows"][0]["ok"]
    assert report["first_divergence"] == "layers.0.input_norm"
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trace_format_validator_names_the_tensor_and_the_shape(engines, tmp_path):
    engine = engines("tinyllama", "float32")
    c, ids = engine.config, [5, 1, 7, 2]
    t = engine.trace(ids)
    shapes = expected_shapes(TraceDims.of(c, len(ids)))
    assert list(shapes) == list(t) and all(shapes[n] == t[n].shape for n in t)
    assert validate_trace(t, shapes) == []
    repeated = dict(t, **{"layers.1.k": np.repeat(t["layers.1.k"], 4, axis=0)})  # KV heads repeated for GQA
    with pytest.raises(TraceFormatError, match=r"'layers.1.k' has shape \(8, 4, 8\), expected \(2, 4, 8\) \(KV "
                                               r"heads, not repeated"):
        compare_traces(t, repeated)
    batched = dict(t, embeddings=t["embeddings"][None])
    with pytest.raises(TraceFormatError, match=r"'embeddings' has shape \(1, 4, 64\), expected \(4, 64\)"):
        compare_traces(t, batched)
    partial = {k: v for k, v in t.items() if not k.endswith(".v")}
    with pytest.raises(TraceFormatError, match=r"2 tensors missing: layers.0.v, layers.1.v"):
        compare_traces(t, partial)
    rows = compare_traces(t, partial, allow_missing=True)
    assert [r.name for r in rows if r.missing] == ["layers.0.v", "layers.1.v"] and all(r.ok for r in rows)
    # the file form: a JSON manifest beside the tensors, read back without pickle
    save_trace(tmp_path / "t.npz", t, engine="my-engine", version="1.2", dtype="float32", ids=ids)
    back, manifest = load_trace(tmp_path / "t.npz")
    assert manifest == {"engine": "my-engine", "version": "1.2", "dtype": "float32", "ids": ids}
    assert list(back) == list(t) and all(np.array_equal(back[k], t[k]) for k in t)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(TraceFormatError, match=r"bad\.npz: not a readable trace"):
        load_trace(tmp_path / "bad.npz")


def test_trace_and_compare_commands_label_sides_and_exit_codes(tmp_path):
    run = [sys.executable, "-m", "refllama"]
    model, ids = str(FIXTURES / "tinyllama"), "3,1,4,1,5,9"
    out = tmp_path / "t.npz"
    r = subprocess.run([*run, "trace", model, "--ids", ids, "--out", str(out), "--dtype", "float64"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert load_trace(out)[1]["engine"] == "refllama-numpy"
    r = subprocess.run([*run, "compare", str(out), model, "--ids", ids, "--json", "--decode-from", "2"],
                       capture_output=True, text=True, timeout=300)
    report = json.loads(r.stdout)
    assert r.returncode == 0 and report["first_divergence"] is None and report["missing"] == []
    assert report["reference"] == f"{out}: refllama-numpy {refllama.__version__} (float64)"
    assert report["candidate"] == f"{model} (refllama numpy float32, KV cache from 2)"
    r = subprocess.run([*run, "compare", str(out), model, "--ids", ids, "--profile", "f64"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1 and "first divergence beyond 'f64'" in r.stdout
    for bad in (["--profile", "f17"], ["--ids", "1,x"]):
        r = subprocess.run([*run, "compare", str(out), model, "--ids", ids, *bad], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 2 and r.stderr.startswith("refllama: error:"), r.stderr
    r = subprocess.run([*run, "compare", str(out), str(FIXTURES / "llama32"), "--ids", ids], capture_output=True,
                       text=True, timeout=300)  # another model's shapes: the validator names the first tensor
    assert r.returncode == 2 and "'layers.0.q' has shape" in r.stderr


def test_float32_passes_f32_against_float64_on_adversarial_ids():
    """The f32 profile's calibration set on SmolLM2 (shortened): special ids, BOS only, repeats, random ids and
    natural text; refllama's own float32 must raise no false alarm on any of them."""
    from conftest import smollm2_path

    path = smollm2_path()
    e64, e32 = refllama.load(path, dtype="float64"), refllama.load(path, dtype="float32")
    vocab = e64.config.vocab_size
    rng = np.random.default_rng(0)
    sequences = {"special": [1, 2, 3, 4], "bos_x16": [1] * 16, "random": rng.integers(0, vocab, 16),
                 "random_top": rng.integers(vocab - 1000, vocab, 16),
                 "natural": e64.tokenizer.encode("The capital of France is Paris. The capital of Germany is")}
    for name, ids in sequences.items():
        try:
            assert_logits_close(e64.logits(ids), e32.logits(ids), "f32")
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


def test_mlx_lm_trace_loads_into_compare(tmp_path):
    """MLX-LM's Llama module, traced under our names, agrees with refllama float64 at every tensor. (~5 s)"""
    pytest.importorskip("mlx_lm", reason="needs mlx-lm (the [mlx] extra)")
    out, ids = tmp_path / "mlx.npz", "3,1,4,1,5,9,2,6"
    run = [sys.executable, "-m", "refllama"]
    subprocess.run([*run, "trace", str(FIXTURES / "llama32"), "--engine", "mlx-lm", "--ids", ids, "--out", str(out)],
                   check=True, capture_output=True, timeout=300)
    trace, manifest = load_trace(out)
    assert manifest["engine"] == "mlx-lm" and len(trace) == 3 + 9 * 2
    r = subprocess.run([*run, "compare", str(FIXTURES / "llama32"), str(out), "--ids", ids, "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["candidate"].endswith("mlx-lm " + manifest["version"] + " (float32)")
