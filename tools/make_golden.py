"""Make the golden reference outputs in golden/ with Hugging Face transformers (needs the [golden] extra).

For each fixture in tests/fixtures/ (tools/make_fixtures.py), with `LlamaForCausalLM` and eager attention:

* logits at every position of three fixed id sequences (lengths 1, 10 and 48, the last past every RoPE
  threshold of the fixtures), in float32, in stock float64, and in "pure" float64;
* a 16-token greedy continuation of the length-10 sequence (`generate`, KV cache, stopping at eos), float32 and
  pure float64;
* HF's RoPE inverse-frequency table (pure float64), and for the dynamic-NTK fixture also the enlarged table of
  a length-48 call plus cached token-by-token decoding logits past max_position_embeddings.

Stock transformers is not truly float64: for a float64 model it still computes RMSNorm, the RoPE tables
(inv_freq included) and the eager softmax in float32. "Pure" float64 runs HF's own code with exactly those three
steps patched to float64 (`hf_float64_patched` below; the manifest records the patch). Every sequence runs on a
freshly loaded model, because HF's dynamic RoPE remembers the longest previous call.

    python tools/make_golden.py                  # rewrite golden/*.npz and golden/manifest.json
    python tools/make_golden.py --check tinyllama  # regenerate one fixture and compare with the committed file
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import platform
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from make_fixtures import FIXTURES, FIXTURES_DIR, fixture_config  # noqa: E402

GOLDEN_DIR = ROOT / "golden"
LENGTHS = (1, 10, 48)
GREEDY_PROMPT_LENGTH = 10
GREEDY_NEW_TOKENS = 16
DYNAMIC_PREFILL = 16  # cached-decoding record for the dynamic fixture: prefill 16, then one token at a time

F64_PATCH = ("transformers' LlamaRMSNorm.forward, eager_attention_forward's softmax and LlamaRotaryEmbedding "
             "(inv_freq init, dynamic-NTK recomputation and the cos/sin forward) patched to compute in float64 "
             "instead of float32; everything else is stock HF code")

# Near-identical reruns on other CPUs may differ in the last bits (BLAS kernel choice): what --check allows.
CHECK_ATOL = {"f32": 2e-5, "f64": 1e-11}


def sequences(name: str) -> dict[int, np.ndarray]:
    seed = FIXTURES[name][2]
    rng = np.random.default_rng(1000 + seed)
    vocab = fixture_config(name)["vocab_size"]
    return {n: rng.integers(0, vocab, size=n, dtype=np.int64) for n in LENGTHS}


@contextlib.contextmanager
def hf_float64_patched() -> Iterator[None]:
    """Make stock HF Llama a true float64 computation for float64 models (restored on exit)."""
    import torch
    from torch import nn
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
    from transformers.models.llama import modeling_llama as ml

    saved = {
        "rms": ml.LlamaRMSNorm.forward, "eager": ml.eager_attention_forward,
        "rope_fwd": ml.LlamaRotaryEmbedding.forward,
        "rope_default": ml.LlamaRotaryEmbedding.__dict__["compute_default_rope_parameters"],
        "rope_init": dict(ROPE_INIT_FUNCTIONS),
    }

    def rms_forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        compute = torch.float64 if input_dtype == torch.float64 else torch.float32
        hidden_states = hidden_states.to(compute)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        key_states = ml.repeat_kv(key, module.num_key_value_groups)
        value_states = ml.repeat_kv(value, module.num_key_value_groups)
        attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
        if attention_mask is not None:
            attn_weights = attn_weights + attention_mask
        softmax_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
        attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=softmax_dtype).to(query.dtype)
        attn_output = torch.matmul(attn_weights, value_states)
        return attn_output.transpose(1, 2).contiguous(), attn_weights

    def in_float64(fn):
        # The rope init functions spell float32 as `torch.float` and get it from int64 arithmetic through the
        # default dtype; run them with both meaning float64.
        def wrapped(*args, **kwargs):
            old_float, old_default = torch.float, torch.get_default_dtype()
            torch.float = torch.float64
            torch.set_default_dtype(torch.float64)
            try:
                return fn(*args, **kwargs)
            finally:
                torch.float = old_float
                torch.set_default_dtype(old_default)
        return wrapped

    def rope_forward(self, x, position_ids):
        freqs = position_ids[..., None].to(torch.float64) * self.inv_freq.to(device=x.device, dtype=torch.float64)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)

    ml.LlamaRMSNorm.forward = rms_forward
    ml.eager_attention_forward = eager
    ml.LlamaRotaryEmbedding.forward = dynamic_rope_update(rope_forward)
    ml.LlamaRotaryEmbedding.compute_default_rope_parameters = staticmethod(
        in_float64(saved["rope_default"].__func__))
    for key, fn in saved["rope_init"].items():
        ROPE_INIT_FUNCTIONS[key] = in_float64(fn)
    try:
        yield
    finally:
        ml.LlamaRMSNorm.forward = saved["rms"]
        ml.eager_attention_forward = saved["eager"]
        ml.LlamaRotaryEmbedding.forward = saved["rope_fwd"]
        ml.LlamaRotaryEmbedding.compute_default_rope_parameters = saved["rope_default"]
        ROPE_INIT_FUNCTIONS.clear()
        ROPE_INIT_FUNCTIONS.update(saved["rope_init"])


def _load(folder: Path, dtype):
    from transformers import LlamaForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()

    model = LlamaForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager")
    model.eval()
    return model


def _forward_logits(folder: Path, dtype, ids: np.ndarray) -> np.ndarray:
    import torch

    model = _load(folder, dtype)  # fresh per sequence: HF's dynamic RoPE remembers earlier calls
    x = torch.from_numpy(ids)[None]
    with torch.no_grad():
        out = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False)
    return out.logits[0].numpy()


def _greedy(folder: Path, dtype, ids: np.ndarray) -> np.ndarray:
    import torch

    model = _load(folder, dtype)
    x = torch.from_numpy(ids)[None]
    eos = model.generation_config.eos_token_id
    pad = eos[0] if isinstance(eos, list) else eos
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                             max_new_tokens=GREEDY_NEW_TOKENS, pad_token_id=pad)
    return out[0, len(ids):].numpy().astype(np.int64)


def _cached_decode(folder: Path, dtype, ids: np.ndarray) -> np.ndarray:
    """Logits of prefilling DYNAMIC_PREFILL tokens, then feeding the rest one at a time through HF's cache."""
    import torch

    model = _load(folder, dtype)
    x = torch.from_numpy(ids)[None]
    rows = []
    with torch.no_grad():
        out = model(input_ids=x[:, :DYNAMIC_PREFILL], use_cache=True)
        rows.append(out.logits[0])
        past = out.past_key_values
        for t in range(DYNAMIC_PREFILL, len(ids)):
            out = model(input_ids=x[:, t:t + 1], cache=past, use_cache=True,
                        position_ids=torch.tensor([[t]]))
            past = out.past_key_values
            rows.append(out.logits[0])
    return torch.cat(rows).numpy()


def golden_for_fixture(name: str, fixtures_dir: Path = FIXTURES_DIR) -> dict[str, np.ndarray]:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(1)  # one thread: reduction order, and so the last bits, do not depend on the machine
    folder = fixtures_dir / name
    seqs = sequences(name)
    out: dict[str, np.ndarray] = {}
    for n, ids in seqs.items():
        out[f"ids_{n}"] = ids
        out[f"logits_{n}_f32"] = _forward_logits(folder, torch.float32, ids)
    longest = seqs[max(LENGTHS)]
    out[f"logits_{max(LENGTHS)}_f64stock"] = _forward_logits(folder, torch.float64, longest)
    prompt = seqs[GREEDY_PROMPT_LENGTH]
    out["greedy_f32"] = _greedy(folder, torch.float32, prompt)
    dynamic = (fixture_config(name).get("rope_scaling") or {}).get("type") == "dynamic"
    if dynamic:
        out["cached_decode_f32"] = _cached_decode(folder, torch.float32, seqs[max(LENGTHS)])
    with hf_float64_patched():
        for n, ids in seqs.items():
            out[f"logits_{n}_f64"] = _forward_logits(folder, torch.float64, ids)
        out["greedy_f64"] = _greedy(folder, torch.float64, prompt)
        model = _load(folder, torch.float64)
        out["inv_freq"] = model.model.rotary_emb.inv_freq.numpy().copy()
        if dynamic:
            out["cached_decode_f64"] = _cached_decode(folder, torch.float64, seqs[max(LENGTHS)])
            with torch.no_grad():
                long = torch.from_numpy(seqs[max(LENGTHS)])[None]
                model(input_ids=long, use_cache=False)
            out[f"inv_freq_len{max(LENGTHS)}"] = model.model.rotary_emb.inv_freq.numpy().copy()
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


KEY_DOCS = {
    "ids_N": "int64 input ids of the length-N sequence",
    "logits_N_f32": "HF float32 logits (N, vocab), stock code",
    "logits_N_f64": "HF float64 logits (N, vocab) with the float64 patch (true float64)",
    "logits_N_f64stock": "HF float64 logits (N, vocab) of the longest sequence, stock code (RMSNorm, RoPE and "
                         "softmax in float32), kept for the record",
    "greedy_f32": f"{GREEDY_NEW_TOKENS} greedy new tokens after ids_{GREEDY_PROMPT_LENGTH}, HF generate, float32",
    "greedy_f64": "the same in patched float64",
    "inv_freq": "HF's RoPE inverse frequencies at load (patched float64)",
    "inv_freq_lenN": "dynamic NTK: HF's table after a length-N call",
    "cached_decode_f32": f"dynamic NTK: logits of prefilling {DYNAMIC_PREFILL} ids of the longest sequence, then "
                         "one token per call through HF's cache (rows = positions), float32",
    "cached_decode_f64": "the same in patched float64",
}


def write_all(names: list[str]) -> None:
    import torch
    import transformers

    GOLDEN_DIR.mkdir(exist_ok=True)
    manifest_path = GOLDEN_DIR / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"fixtures": {}}
    for name in names:
        arrays = golden_for_fixture(name)
        path = GOLDEN_DIR / f"{name}.npz"
        np.savez_compressed(path, **arrays)
        folder = FIXTURES_DIR / name
        dtype, description = FIXTURES[name][1], FIXTURES[name][4]
        manifest["fixtures"][name] = {
            "description": description,
            "fixture": f"tests/fixtures/{name}",
            "stored_dtype": dtype,
            "fixture_sha256": {p.name: sha256(p) for p in sorted(folder.iterdir())},
            "golden": f"golden/{name}.npz",
            "golden_sha256": sha256(path),
            "keys": sorted(arrays),
        }
        print(f"{name}: {len(arrays)} arrays -> {path.relative_to(ROOT)}")
    manifest.update({
        "generator": "tools/make_golden.py",
        "regenerate": "pip install -e '.[golden]' && python tools/make_fixtures.py && python tools/make_golden.py",
        "reference": "transformers LlamaForCausalLM, attn_implementation='eager', one torch thread",
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__,
                     "numpy": np.__version__, "python": platform.python_version(), "machine": platform.machine()},
        "float64_patch": F64_PATCH,
        "sequence_lengths": list(LENGTHS),
        "key_docs": KEY_DOCS,
    })
    manifest["fixtures"] = dict(sorted(manifest["fixtures"].items()))
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")


def check(names: list[str]) -> int:
    """Regenerate and compare with the committed golden files; non-zero exit on any difference."""
    failures = 0
    for name in names:
        fresh = golden_for_fixture(name)
        with np.load(GOLDEN_DIR / f"{name}.npz") as committed:
            if sorted(committed.files) != sorted(fresh):
                print(f"{name}: keys differ: {sorted(committed.files)} vs {sorted(fresh)}")
                failures += 1
                continue
            for key, value in fresh.items():
                ref = committed[key]
                if value.dtype.kind in "iu":
                    ok, diff = np.array_equal(ref, value), "exact"
                else:
                    tol = CHECK_ATOL["f64" if value.dtype == np.float64 else "f32"]
                    d = float(np.max(np.abs(ref - value))) if ref.shape == value.shape else float("inf")
                    ok, diff = d <= tol, f"max|diff| {d:.3g} (allowed {tol:g})"
                print(f"{name}/{key}: {'ok' if ok else 'MISMATCH'} {diff}")
                failures += not ok
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="regenerate and compare instead of writing")
    parser.add_argument("names", nargs="*", default=list(FIXTURES))
    args = parser.parse_args()
    if args.check:
        return check(args.names)
    write_all(args.names)
    return 0


if __name__ == "__main__":
    sys.exit(main())
