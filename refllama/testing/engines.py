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


# llama.cpp's graph node names (src/models/llama.cpp, llama-graph.cpp) -> refllama's: per layer ("NAME-N"), and global.
# Several nodes may share a name (Qcur-N: the matmul, its 3-D view, the RoPE output); the last one computed is the
# one the format means. The attention before o_proj (kqv_out-N) has no name in our format.
LLAMACPP_LAYER_NAMES = {"attn_norm": "input_norm", "Qcur": "q", "Kcur": "k", "Vcur": "v",
                        "attn_out": "attention_output", "ffn_inp": "residual_attention",
                        "ffn_norm": "post_attention_norm", "ffn_out": "mlp_output", "l_out": "residual"}
LLAMACPP_GLOBAL_NAMES = {"inp_embd": "embeddings", "embd": "embeddings", "result_norm": "final_norm",
                         "result_output": "logits"}


def llamacpp_name(ggml_name: str) -> str | None:
    """Our trace name for a llama.cpp graph node ("Qcur-3" -> "layers.3.q"), or None for a node we do not read."""
    if ggml_name in LLAMACPP_GLOBAL_NAMES:
        return LLAMACPP_GLOBAL_NAMES[ggml_name]
    base, _, layer = ggml_name.rpartition("-")
    if base in LLAMACPP_LAYER_NAMES and layer.isdigit():
        return f"layers.{int(layer)}.{LLAMACPP_LAYER_NAMES[base]}"
    return None


def from_ggml(name: str, values: np.ndarray, ne: tuple[int, int, int, int]) -> np.ndarray | None:
    """One contiguous ggml tensor (its elements in memory order, ggml's extents `ne`) in our layout for `name`, or None
    for a node of that name that is not the tensor the format means (q, k, v before their reshape into heads).

    ggml's ne[0] is the fastest-varying axis, numpy's last: the array is values.reshape(ne[::-1]). q, k and v arrive
    as ne = (head_dim, heads, T, 1), so (T, heads, head_dim), and become (heads, T, head_dim). GGUF files store the
    q and k projections' rows permuted per head so that llama.cpp's RoPE rotates adjacent pairs (2i, 2i + 1); the
    Hugging Face order, which refllama's GGUF loader restores, pairs i with i + head_dim/2. So q and k are put back
    as (even elements, odd elements) along head_dim."""
    x = values.reshape(tuple(reversed(ne)))
    if name.rsplit(".", 1)[-1] in ("q", "k", "v"):
        if ne[2] == 1 or ne[3] != 1:  # the 2-D projection output (width, T), not yet in heads
            return None
        x = x[0].transpose(1, 0, 2)  # (T, heads, D) -> (heads, T, D)
        if not name.endswith(".v"):
            x = np.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)  # adjacent pairs -> rotate-half order
        return x
    if ne[2] != 1 or ne[3] != 1:
        return None
    return x[0, 0]  # (T, width)


def llamacpp_trace(path: str, ids: list[int], dtype: str = "as stored", kv_cache: str = "f16",
                   flash_attention: bool | None = None, threads: int = 2) -> tuple[Trace, dict]:
    """llama.cpp through llama-cpp-python's low-level API: one batch of every id with logits for each, and every
    ggml node whose name maps to ours (`llamacpp_name`) read back in the scheduler's eval callback (`cb_eval`,
    which llama_cpp.Llama does not pass on). llama.cpp computes in its own types, which is what the trace shows:
    activations quantized to q8_1 for a Q8_0 matmul, the KV cache in `kv_cache` ("f16", llama.cpp's default, or
    "f32"), and flash attention where `flash_attention` says (None: llama.cpp's default, "auto")."""
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
    element = {0: np.float32, 1: np.float16}  # enum ggml_type: F32, F16
    kv_types = {"f16": 1, "f32": 0}
    if kv_cache not in kv_types:
        raise InputError(f"kv_cache must be one of {', '.join(kv_types)}, not {kv_cache!r}")
    found: Trace = {}

    def callback(tensor, ask, _user):
        name = llamacpp_name(ggml.ggml_get_name(tensor).decode(errors="replace"))
        if ask or name is None:
            return name is not None
        kind = ctypes.c_int.from_address(tensor).value
        ne = tuple((ctypes.c_int64 * 4).from_address(tensor + 16))  # ggml_tensor: type, buffer, ne[4], nb[4], ...
        if kind not in element or not ggml.ggml_is_contiguous(tensor):
            return True
        buf = np.empty(ggml.ggml_nbytes(tensor), dtype=np.uint8)
        ggml.ggml_backend_tensor_get(tensor, buf.ctypes.data, 0, buf.size)
        value = from_ggml(name, buf.view(element[kind]).astype(np.float64), ne)
        if value is not None:
            found[name] = value
        return True

    @ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
    def quiet(_level, _text, _user):  # llama.cpp logs to stderr by default
        pass

    c_callback = llama_cpp.ggml_backend_sched_eval_callback(callback)
    llama_cpp.llama_log_set(quiet, None)
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
    if not model:
        raise InputError(f"llama.cpp could not load {path}")
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = max(len(ids), 8)
    params.n_threads = params.n_threads_batch = threads
    params.type_k = params.type_v = kv_types[kv_cache]
    if flash_attention is not None:
        params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attention
                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
    params.cb_eval, params.cb_eval_user_data = c_callback, None
    ctx = llama_cpp.llama_init_from_model(model, params)
    batch = llama_cpp.llama_batch_init(len(ids), 0, 1)
    try:
        if not ctx:
            raise InputError(f"llama.cpp could not make a context for {path}")
        for i, token in enumerate(ids):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, i, 1, True
            batch.seq_id[i][0] = 0
        batch.n_tokens = len(ids)
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise InputError(f"llama.cpp could not evaluate the ids on {path}")
        layers = llama_cpp.llama_model_n_layer(model)
    finally:
        llama_cpp.llama_batch_free(batch)
        if ctx:
            llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
    return _ordered(found, layers), {
        "engine": "llama.cpp (llama-cpp-python)", "version": _version("llama-cpp-python"), "dtype": dtype,
        "kv_cache": kv_cache, "flash_attention": "auto" if flash_attention is None else flash_attention,
        "missing": [name for name in trace_names(layers) if name not in found]}


ENGINES = {"hf": hf_trace, "llamacpp": llamacpp_trace, "mlx-lm": mlx_lm_trace}
