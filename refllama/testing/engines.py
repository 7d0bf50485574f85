"""Traces of other engines under refllama's names (docs/trace-format.md), for `refllama trace --engine ...`.

* `hf`: transformers' LlamaForCausalLM with forward hooks (needs the [golden] extra: torch and transformers);
* `llamacpp`: llama-cpp-python, reading the ggml graph through its eval callback (`cb_eval`), for a .gguf file;
* `mlx-lm`: MLX-LM's Llama module, recording each sublayer's output (needs mlx-lm; runs on Linux with mlx[cpu]).

Each returns ({name: float64 array}, manifest fields). An engine that cannot show a tensor leaves it out; the
comparison then lists it as missing. Nothing here downloads anything: every path is a local model.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from pathlib import Path

import numpy as np

from refllama.errors import InputError
from refllama.testing.traces import trace_names

Trace = dict[str, np.ndarray]


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _ordered(found: Trace, layers: int) -> Trace:
    return {name: found[name] for name in trace_names(layers) if name in found}


def _heads_first(x: np.ndarray, heads: int) -> np.ndarray:
    """(T, heads * D) -> (heads, T, D)."""
    return x.reshape(x.shape[0], heads, -1).transpose(1, 0, 2)


def refllama_trace(path: str, ids: list[int], dtype: str, backend: str = "numpy",
                   decode_from: int | None = None) -> tuple[Trace, dict]:
    import refllama

    engine = refllama.load(path, backend=backend, dtype=dtype)
    return engine.trace(ids, decode_from=decode_from), {"engine": f"refllama-{backend}",
                                                         "version": refllama.__version__, "dtype": dtype}


def hf_trace(path: str, ids: list[int], dtype: str) -> tuple[Trace, dict]:
    """transformers, eager attention, through forward hooks and a wrapped apply_rotary_pos_emb (q and k after
    RoPE). A .gguf path is read with transformers' own GGUF loader."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.llama import modeling_llama as ml

    p = Path(path)
    kwargs = {"gguf_file": p.name} if p.suffix == ".gguf" else {}
    model = AutoModelForCausalLM.from_pretrained(p.parent if kwargs else p, dtype=getattr(torch, dtype),
                                                 attn_implementation="eager", **kwargs).eval()
    found: Trace = {}
    hooks = []

    def keep(name: str, heads: int | None = None) -> Callable:
        def hook(_module, _inputs, output):
            value = (output[0] if isinstance(output, tuple) else output).detach()[0].to(torch.float64).numpy()
            found[name] = value if heads is None else _heads_first(value, heads)
        return hook

    layers = model.model.layers
    hooks.append(model.model.embed_tokens.register_forward_hook(keep("embeddings")))
    for i, layer in enumerate(layers):
        hooks += [layer.input_layernorm.register_forward_hook(keep(f"layers.{i}.input_norm")),
                  layer.self_attn.v_proj.register_forward_hook(keep(f"layers.{i}.v",
                                                                    model.config.num_key_value_heads)),
                  layer.self_attn.register_forward_hook(keep(f"layers.{i}.attention_output")),
                  layer.post_attention_layernorm.register_forward_hook(keep(f"layers.{i}.post_attention_norm")),
                  layer.mlp.register_forward_hook(keep(f"layers.{i}.mlp_output")),
                  layer.register_forward_hook(keep(f"layers.{i}.residual"))]
    hooks.append(model.model.norm.register_forward_hook(keep("final_norm")))
    rope, calls = ml.apply_rotary_pos_emb, []

    def traced_rope(q, k, cos, sin, *args, **kwargs):
        q, k = rope(q, k, cos, sin, *args, **kwargs)
        calls.append((q.detach()[0].to(torch.float64).numpy(), k.detach()[0].to(torch.float64).numpy()))
        return q, k

    ml.apply_rotary_pos_emb = traced_rope
    try:
        with torch.no_grad():
            found["logits"] = model(torch.tensor([ids])).logits[0].to(torch.float64).numpy()
    finally:
        ml.apply_rotary_pos_emb = rope
        for h in hooks:
            h.remove()
    for i, (q, k) in enumerate(calls):
        found[f"layers.{i}.q"], found[f"layers.{i}.k"] = q, k
        found[f"layers.{i}.residual_attention"] = found[f"layers.{i}.residual"] - found[f"layers.{i}.mlp_output"]
    import transformers

    return _ordered(found, len(layers)), {"engine": "transformers", "version": transformers.__version__,
                                          "dtype": dtype}


def mlx_lm_trace(path: str, ids: list[int], dtype: str = "float32") -> tuple[Trace, dict]:
    """MLX-LM's Llama model (`mlx_lm.utils.load_model` on a local Hugging Face folder; no tokenizer needed),
    each sublayer wrapped to record its output: q and k after RoPE from the `rope` module (called for q, then k),
    v from v_proj."""
    import mlx.core as mx
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(path))
    model.set_dtype(getattr(mx, dtype))  # mlx_lm keeps the checkpoint's dtype; compute in the one asked for
    inner, found = model.model, {}

    def host(x) -> np.ndarray:
        return np.array(x[0].astype(mx.float32), dtype=np.float64)

    class Recorder:
        """The wrapped module, keeping each output under the next of `names` (cycling)."""

        def __init__(self, module, *names: str, convert: Callable = host):
            self.module, self.names, self.convert, self.calls = module, names, convert, 0

        def __call__(self, *args, **kwargs):
            out = self.module(*args, **kwargs)
            found[self.names[self.calls % len(self.names)]] = self.convert(out)
            self.calls += 1
            return out

        def __getattr__(self, attr):  # e.g. embed_tokens.as_linear for tied embeddings
            return getattr(self.module, attr)

    kv_heads = inner.layers[0].self_attn.n_kv_heads
    for i, layer in enumerate(inner.layers):
        attn = layer.self_attn
        attn.rope = Recorder(attn.rope, f"layers.{i}.q", f"layers.{i}.k")  # (1, heads, T, D)
        attn.v_proj = Recorder(attn.v_proj, f"layers.{i}.v", convert=lambda out: _heads_first(host(out), kv_heads))
        layer.input_layernorm = Recorder(layer.input_layernorm, f"layers.{i}.input_norm")
        layer.self_attn = Recorder(attn, f"layers.{i}.attention_output")
        layer.post_attention_layernorm = Recorder(layer.post_attention_layernorm, f"layers.{i}.post_attention_norm")
        layer.mlp = Recorder(layer.mlp, f"layers.{i}.mlp_output")
    inner.embed_tokens = Recorder(inner.embed_tokens, "embeddings")
    inner.norm = Recorder(inner.norm, "final_norm")
    found["logits"] = host(model(mx.array([ids])))
    x = found["embeddings"]
    for i in range(len(inner.layers)):  # the residual stream, from the recorded sublayer outputs
        found[f"layers.{i}.residual_attention"] = x + found[f"layers.{i}.attention_output"]
        x = found[f"layers.{i}.residual"] = found[f"layers.{i}.residual_attention"] + found[f"layers.{i}.mlp_output"]
    return _ordered(found, len(inner.layers)), {"engine": "mlx-lm", "version": _version("mlx-lm"), "dtype": dtype}


# llama.cpp's graph names (llama-graph / models/llama) -> refllama's, per layer; "-N" is the layer suffix.
LLAMACPP_NAMES = {"attn_norm": "input_norm", "Qcur": "q", "Kcur": "k", "Vcur": "v", "ffn_inp": "residual_attention",
                  "ffn_norm": "post_attention_norm", "ffn_out": "mlp_output", "l_out": "residual"}
LLAMACPP_GLOBAL = {"inp_embd": "embeddings", "result_norm": "final_norm", "result_output": "logits"}


def llamacpp_trace(path: str, ids: list[int], dtype: str = "as stored") -> tuple[Trace, dict]:
    """llama.cpp through llama-cpp-python: one batch of every id, every ggml node whose name maps to ours read
    back in the eval callback. llama.cpp computes in its own types (activations quantized to q8_1 for a Q8_0
    matmul, an f16 KV cache by default), which is what such a trace shows."""
    import ctypes

    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    ggml = next((ctypes.CDLL(str(p)) for name in ("libggml-base.so", "libggml.so", "libggml-base.dylib")
                 if (p := lib_dir / name).exists()), None)
    if ggml is None:
        raise InputError(f"no ggml library found in {lib_dir}")
    ggml.ggml_get_name.restype = ctypes.c_char_p
    ggml.ggml_get_name.argtypes = [ctypes.c_void_p]
    ggml.ggml_nbytes.restype = ctypes.c_size_t
    ggml.ggml_nbytes.argtypes = [ctypes.c_void_p]
    ggml.ggml_is_contiguous.restype = ctypes.c_bool
    ggml.ggml_is_contiguous.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    F32, F16 = 0, 1  # enum ggml_type

    def ours(name: str) -> str | None:
        if name in LLAMACPP_GLOBAL:
            return LLAMACPP_GLOBAL[name]
        base, _, layer = name.rpartition("-")
        return f"layers.{layer}.{LLAMACPP_NAMES[base]}" if base in LLAMACPP_NAMES and layer.isdigit() else None

    found: Trace = {}

    def callback(tensor, ask, _user):
        name = ours(ggml.ggml_get_name(tensor).decode(errors="replace"))
        if ask or name is None:
            return name is not None
        kind = ctypes.c_int.from_address(tensor).value
        ne = list((ctypes.c_int64 * 4).from_address(tensor + 16))  # ggml_tensor: type, buffer, ne[4], nb[4], ...
        if kind not in (F32, F16) or not ggml.ggml_is_contiguous(tensor):
            return True
        buf = np.empty(ggml.ggml_nbytes(tensor), dtype=np.uint8)
        ggml.ggml_backend_tensor_get(tensor, buf.ctypes.data, 0, buf.size)
        value = buf.view(np.float32 if kind == F32 else np.float16).astype(np.float64)
        found[name] = value.reshape(ne[::-1]).squeeze(axis=(0,)) if ne[3] == 1 else value.reshape(ne[::-1])
        return True

    c_callback = llama_cpp.ggml_backend_sched_eval_callback(callback)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(len(ids), 8), n_batch=max(len(ids), 8),
                          n_ubatch=max(len(ids), 8), logits_all=True, verbose=False, n_threads=2,
                          cb_eval=c_callback)
    try:
        llm.eval(ids)
    finally:
        llm.close()
    # q, k, v arrive as (T, heads, D) (ggml ne = [D, heads, T]); the rest as (T, width).
    for name in list(found):
        if name.rsplit(".", 1)[-1] in ("q", "k", "v") and found[name].ndim == 3:
            found[name] = found[name].transpose(1, 0, 2)
    layers = 1 + max((int(n.split(".")[1]) for n in found if n.startswith("layers.")), default=-1)
    for i in range(layers):
        previous = found.get("embeddings") if i == 0 else found.get(f"layers.{i - 1}.residual")
        if previous is not None and f"layers.{i}.residual_attention" in found:
            found[f"layers.{i}.attention_output"] = found[f"layers.{i}.residual_attention"] - previous
    return _ordered(found, layers), {"engine": "llama.cpp (llama-cpp-python)", "version": _version(
        "llama-cpp-python"), "dtype": dtype}


ENGINES = {"hf": hf_trace, "llamacpp": llamacpp_trace, "mlx-lm": mlx_lm_trace}
