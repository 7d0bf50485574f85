"""Golden outputs for the mixture-of-experts fixtures (tools/make_moe_fixtures.py), made by transformers.

For each fixture, with eager attention and the eager experts loop (`experts_implementation="eager"`):

* logits at every position of three fixed id sequences (lengths 1, 10, 48) in float32 and in true float64;
* the router logits of every MoE layer for the length-48 sequence (float32 and true float64), from which the
  tests read HF's expert choice;
* a 16-token greedy continuation of the length-10 sequence through HF's KV cache, float32 and true float64.

Stock transformers is not truly float64 for a float64 model: RMSNorm, RoPE, the attention softmax (Mixtral), the
router's softmax / sigmoid and Llama 4's complex RoPE and attention temperature run in float32. "True" float64
patches exactly those steps (`float64_patched`); everything else is stock code.

Needs the `[golden_moe]` extra: transformers 5.25.0, which the manifest records for these fixtures (the dense
goldens' 5.24.0 lacks Llama 4 classes the float64 patch names).

    python tools/make_moe_golden.py                 # write golden/<fixture>.npz and their manifest entries
    python tools/make_moe_golden.py --check mixtral  # regenerate and compare with the committed file
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from make_moe_fixtures import FIXTURES_DIR, MOE_FIXTURES  # noqa: E402

from make_golden import compare_with_committed  # noqa: E402

GOLDEN_DIR = ROOT / "golden"
LENGTHS = (1, 10, 48)
GREEDY_PROMPT_LENGTH = 10
GREEDY_NEW_TOKENS = 16

F64_PATCH = ("Mixtral: MixtralRMSNorm, the eager attention softmax, the rotary tables and the router softmax in "
             "float64; Llama 4: Llama4TextRMSNorm, the weightless QK norm, the rotary tables and complex RoPE, "
             "the attention temperature and the router sigmoid in float64; everything else stock HF code")


def sequences(name: str) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(2000 + MOE_FIXTURES[name][3])
    vocab = MOE_FIXTURES[name][1]["vocab_size"]
    return {n: rng.integers(0, vocab, size=n, dtype=np.int64) for n in LENGTHS}


def _in_float64(fn):
    """Run a rope init function with `torch.float` and the default dtype meaning float64."""
    import torch

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


@contextlib.contextmanager
def float64_patched() -> Iterator[None]:
    """Make stock HF Mixtral and Llama 4 text a true float64 computation for float64 models (restored on exit)."""
    import torch
    from torch import nn
    from transformers.modeling_rope_utils import dynamic_rope_update
    from transformers.models.llama4 import modeling_llama4 as l4
    from transformers.models.mixtral import modeling_mixtral as mx

    def wide(t):
        return t if t.dtype == torch.float64 else t.float()

    saved = [(mx.MixtralRMSNorm, "forward"), (mx, "eager_attention_forward"), (mx.MixtralRotaryEmbedding, "forward"),
             (mx.MixtralTopKRouter, "forward"), (l4.Llama4TextRMSNorm, "forward"),
             (l4.Llama4TextWeightlessRMSNorm, "forward"), (l4.Llama4TextRotaryEmbedding, "forward"),
             (l4, "apply_rotary_emb"), (l4.Llama4Router, "forward"), (l4.Llama4TextAttention, "forward")]
    originals = [(owner, attr, owner.__dict__[attr]) for owner, attr in saved]
    rope_defaults = [(cls, cls.__dict__["compute_default_rope_parameters"])
                     for cls in (mx.MixtralRotaryEmbedding, l4.Llama4TextRotaryEmbedding)]

    def mixtral_rms(self, hidden_states):
        input_dtype = hidden_states.dtype
        h = wide(hidden_states)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(input_dtype)

    def mixtral_eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        k, v = mx.repeat_kv(key, module.num_key_value_groups), mx.repeat_kv(value, module.num_key_value_groups)
        w = torch.matmul(query, k.transpose(2, 3)) * scaling
        if attention_mask is not None:
            w = w + attention_mask
        w = nn.functional.softmax(w, dim=-1, dtype=wide(query).dtype).to(query.dtype)
        return torch.matmul(w, v).transpose(1, 2).contiguous(), w

    def mixtral_rope(self, x, position_ids):
        freqs = position_ids[..., None].to(torch.float64) * self.inv_freq.to(device=x.device, dtype=torch.float64)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)

    def mixtral_router(self, hidden_states):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        logits = nn.functional.linear(hidden_states, self.weight)
        probs = nn.functional.softmax(wide(logits), dim=-1)
        top, idx = torch.topk(probs, self.top_k, dim=-1)
        return logits, top / top.sum(dim=-1, keepdim=True), idx

    def l4_rms(self, x):
        return self._norm(wide(x)).type_as(x) * self.weight

    def l4_weightless(self, x):
        return self._norm(wide(x)).type_as(x)

    def l4_rope(self, x, position_ids):
        freqs = position_ids[..., None].to(torch.float64) * self.inv_freq.to(device=x.device, dtype=torch.float64)
        return torch.polar(torch.ones_like(freqs), freqs) * self.attention_scaling

    def l4_apply(xq, xk, freqs_cis):
        q = torch.view_as_complex(wide(xq).reshape(*xq.shape[:-1], -1, 2))
        k = torch.view_as_complex(wide(xk).reshape(*xk.shape[:-1], -1, 2))
        fc = freqs_cis[:, :, None, :].to(q.dtype)
        return torch.view_as_real(q * fc).flatten(3).type_as(xq), torch.view_as_real(k * fc).flatten(3).type_as(xk)

    def l4_router(self, hidden_states):
        logits = nn.functional.linear(hidden_states, self.weight)
        top, idx = torch.topk(logits, self.top_k, dim=1)
        scores = torch.full_like(logits, float("-inf")).scatter_(1, idx, top)
        return torch.sigmoid(wide(scores)).to(scores.dtype), logits

    mx.MixtralRMSNorm.forward = mixtral_rms
    mx.eager_attention_forward = mixtral_eager
    mx.MixtralRotaryEmbedding.forward = dynamic_rope_update(mixtral_rope)
    mx.MixtralTopKRouter.forward = mixtral_router
    l4.Llama4TextRMSNorm.forward = l4_rms
    l4.Llama4TextWeightlessRMSNorm.forward = l4_weightless
    l4.Llama4TextRotaryEmbedding.forward = dynamic_rope_update(l4_rope)
    l4.apply_rotary_emb = l4_apply
    l4.Llama4Router.forward = l4_router
    l4.Llama4TextAttention.forward = _l4_attention_f64
    for cls, fn in rope_defaults:
        cls.compute_default_rope_parameters = staticmethod(_in_float64(fn.__func__))
    try:
        yield
    finally:
        for owner, attr, fn in originals:
            setattr(owner, attr, fn)
        for cls, fn in rope_defaults:
            cls.compute_default_rope_parameters = fn


def _l4_attention_f64(self, hidden_states, position_embeddings, attention_mask, cache=None, **kwargs):
    """Llama4TextAttention.forward with the temperature computed in float64 (the only change)."""
    import torch
    from transformers.models.llama4 import modeling_llama4 as l4

    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q = self.q_proj(hidden_states).view(hidden_shape)
    k = self.k_proj(hidden_states).view(*input_shape, -1, self.head_dim)
    v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    if self.use_rope:
        q, k = l4.apply_rotary_emb(q, k, position_embeddings.to(q.device))
    if hasattr(self, "qk_norm"):
        q, k = self.qk_norm(q), self.qk_norm(k)
    if self.attn_temperature_tuning and not self.use_rope:
        past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
        positions = torch.arange(hidden_states.shape[1], device=hidden_states.device) + past
        floors = torch.floor((positions.to(torch.float64) + 1.0) / self.floor_scale)
        scales = torch.log1p(floors) * self.attn_scale + 1.0
        q = (q * scales.view((1, input_shape[-1], 1, 1)).expand((*input_shape, 1, 1))).to(q.dtype)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
    out, weights = l4.eager_attention_forward(self, q, k, v, attention_mask, scaling=self.scaling, dropout=0.0,
                                              **kwargs)
    return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


def _load(folder: Path, dtype):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager",
                                                 experts_implementation="eager")
    return model.eval()


def _forward(model, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Logits (T, vocab) and the router logits of every MoE layer (layers, T, E)."""
    import torch

    x = torch.from_numpy(ids)[None]
    with torch.no_grad():
        out = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False, output_router_logits=True)
    routers = np.stack([r.reshape(len(ids), -1).numpy() for r in out.router_logits])
    return out.logits[0].numpy(), routers


def _greedy(model, ids: np.ndarray) -> np.ndarray:
    import torch

    x = torch.from_numpy(ids)[None]
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                             max_new_tokens=GREEDY_NEW_TOKENS, pad_token_id=0)
    return out[0, len(ids):].numpy().astype(np.int64)


def golden_for_fixture(name: str, fixtures_dir: Path = FIXTURES_DIR) -> dict[str, np.ndarray]:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(1)
    folder = fixtures_dir / name
    seqs = sequences(name)
    out: dict[str, np.ndarray] = {}
    for tag, dtype, ctx in (("f32", torch.float32, contextlib.nullcontext()),
                            ("f64", torch.float64, float64_patched())):
        with ctx:
            model = _load(folder, dtype)
            for n, ids in seqs.items():
                out[f"ids_{n}"] = ids
                out[f"logits_{n}_{tag}"], routers = _forward(model, ids)
                if n == max(LENGTHS):
                    out[f"router_logits_{n}_{tag}"] = routers
            out[f"greedy_{tag}"] = _greedy(model, seqs[GREEDY_PROMPT_LENGTH])
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


KEY_DOCS = {
    "ids_N": "int64 input ids of the length-N sequence",
    "logits_N_f32": "HF float32 logits (N, vocab), stock code, eager attention and eager experts",
    "logits_N_f64": "HF float64 logits (N, vocab) with the float64 patch (true float64)",
    "router_logits_N_f32": "router logits of each MoE layer in order (MoE layers, N, experts), float32",
    "router_logits_N_f64": "the same, true float64",
    "greedy_f32": f"{GREEDY_NEW_TOKENS} greedy new tokens after ids_{GREEDY_PROMPT_LENGTH}, HF generate, float32",
    "greedy_f64": "the same in true float64",
}


def write_all(names: list[str]) -> None:
    import torch
    import transformers

    manifest_path = GOLDEN_DIR / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for name in names:
        arrays = golden_for_fixture(name)
        path = GOLDEN_DIR / f"{name}.npz"
        np.savez_compressed(path, **arrays)
        folder = FIXTURES_DIR / name
        arch, _, dtype, _, _, description = MOE_FIXTURES[name]
        manifest.setdefault("moe_fixtures", {})[name] = {
            "description": description,
            "fixture": f"tests/fixtures/{name}",
            "stored_dtype": dtype,
            "fixture_sha256": {p.name: sha256(p) for p in sorted(folder.iterdir())},
            "golden": f"golden/{name}.npz",
            "golden_sha256": sha256(path),
            "keys": sorted(arrays),
            "generator": "tools/make_moe_fixtures.py, tools/make_moe_golden.py",
            "reference": f"transformers {arch}, attn_implementation='eager', experts_implementation='eager', "
                         "one torch thread",
            "float64_patch": F64_PATCH,
            "key_docs": KEY_DOCS,
            "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
        }
        print(f"{name}: {len(arrays)} arrays -> {path.relative_to(ROOT)}")
    manifest["moe_fixtures"] = dict(sorted(manifest["moe_fixtures"].items()))
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")


def check(names: list[str]) -> int:
    failures = sum(compare_with_committed(name, golden_for_fixture(name)) for name in names)
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="regenerate and compare instead of writing")
    parser.add_argument("names", nargs="*", default=list(MOE_FIXTURES))
    args = parser.parse_args()
    if args.check:
        return check(args.names)
    write_all(args.names)
    return 0


if __name__ == "__main__":
    sys.exit(main())
