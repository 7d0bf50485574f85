"""ModelDiagnostic: what a model folder or GGUF file holds and needs, read from headers only.

Nothing here reads tensor data (unless `verify` is asked for): safetensors headers, the shard index, config and
tokenizer files, or a GGUF's header and metadata. A Llama 3.1 70B-shaped folder of 30 shards analyses in well
under a second.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from refllama import backends
from refllama.config import LlamaConfig
from refllama.diagnostics.memory import MemoryRequirements, estimate, format_bytes, parse_bytes
from refllama.dtypes import DataType
from refllama.errors import BackendError, CheckpointError, InputError, RefLlamaError, TokenizerError, brief
from refllama.formats.checkpoint import expected_shapes, stored_stacked, text_model
from refllama.formats.files import ModelFolder, read_bytes, read_json
from refllama.formats.ggml_quants import GGMLType
from refllama.formats.gguf import GGUFFile
from refllama.formats.gguf_llama import GGUFTensorSource, config_from_gguf
from refllama.formats.safetensors import TensorSource
from refllama.formats.tokenizer import MAX_TOKENIZER_BYTES
from refllama.quant.config import QuantizationConfig

SCHEMA_VERSION = 1


# --- LlamaVariant ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MetaLlama:
    version: str  # "2", "3", "3.1", "3.2", "3.3"
    size: str  # "1B", "8B", "70B", ...


@dataclass(frozen=True)
class TinyLlama:
    version: str  # "1.1B"


@dataclass(frozen=True)
class Distilled:
    base_model: str  # e.g. "Llama-3.1-8B"
    vendor: str  # e.g. "DeepSeek"


@dataclass(frozen=True)
class Mixtral:
    size: str  # "8x7B", "8x22B"


@dataclass(frozen=True)
class Llama4:
    name: str  # "Scout", "Maverick"
    size: str  # "17B-16E", "17B-128E" (active parameters, experts)


@dataclass(frozen=True)
class Custom:
    name: str


LlamaVariant = MetaLlama | TinyLlama | Distilled | Mixtral | Llama4 | Custom

META_SIZES = (1, 3, 7, 8, 13, 34, 70, 405)  # billions, as Meta labels them
TINYLLAMA_SHAPE = (32000, 2048, 5632, 22, 32, 4)  # vocab, hidden, intermediate, layers, heads, kv heads
DISTILL_VENDORS = {"deepseek": "DeepSeek", "nvidia": "NVIDIA", "minitron": "NVIDIA", "arcee": "Arcee",
                   "nous": "NousResearch"}


# Mixtral and Llama 4 text releases by shape: (hidden, layers, experts, experts per token) -> variant
MOE_RELEASES = {(4096, 32, 8, 2): Mixtral("8x7B"), (6144, 56, 8, 2): Mixtral("8x22B"),
                (5120, 48, 16, 1): Llama4("Scout", "17B-16E"), (5120, 48, 128, 1): Llama4("Maverick", "17B-128E")}


def parameter_count(c: LlamaConfig, active: bool = False) -> int:
    """Parameters the config implies (embeddings, untied head, projections, norms, biases, every expert); with
    `active`, those one token uses: in MoE layers the router, top_k experts and the shared expert only."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    attention = c.hidden_size * (q + 2 * kv) + q * c.hidden_size + 2 * c.hidden_size
    if c.attention_bias:
        attention += q + 2 * kv + c.hidden_size
    dense = 3 * c.hidden_size * c.intermediate_size
    if c.mlp_bias:
        dense += 2 * c.intermediate_size + c.hidden_size
    total = 0
    for i in range(c.num_hidden_layers):
        total += attention
        if not c.is_moe_layer(i):
            total += dense
            continue
        m = c.moe
        expert = 3 * c.hidden_size * m.intermediate_size
        total += m.num_experts * c.hidden_size + expert * ((m.top_k if active else m.num_experts) + m.shared_expert)
    embeddings = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    return embeddings + total + c.hidden_size


def size_label(params: int, meta: bool = False) -> str:
    """"8B" for Meta's sizes (nearest label in log scale); otherwise two significant figures ("135M", "1.1B")."""
    billions = params / 1e9
    if meta:
        return f"{min(META_SIZES, key=lambda s: abs(np.log(s / billions)))}B"
    if billions >= 1:
        return f"{billions:.2g}B" if billions < 10 else f"{round(billions)}B"
    return f"{params / 1e6:.3g}M"


def detect_variant(config: LlamaConfig, names: list[str]) -> LlamaVariant:
    """Which Llama this is, from its shape and the names it carries (_name_or_path, folder, GGUF name)."""
    text = " ".join(n for n in names if n).lower()
    params = parameter_count(config)
    if config.moe is not None:
        key = (config.hidden_size, config.num_hidden_layers, config.moe.num_experts, config.moe.top_k)
        release = MOE_RELEASES.get(key)
        if release is not None and type(release).__name__.lower() in config.model_type.replace("_text", ""):
            return release
    shape = (config.vocab_size, config.hidden_size, config.intermediate_size, config.num_hidden_layers,
             config.num_attention_heads, config.num_key_value_heads)
    meta_version = _meta_version(config, text)
    if "distill" in text:
        vendor = next((v for k, v in DISTILL_VENDORS.items() if k in text), None)
        if vendor is None:
            match = re.search(r"([a-z0-9]+)[-_]", text)
            vendor = match.group(1).capitalize() if match else "unknown"
        base = f"Llama-{meta_version}-{size_label(params, meta=True)}" if meta_version else \
            f"Llama-{size_label(params)}"
        return Distilled(base_model=base, vendor=vendor)
    # by name (with TinyLlama's Llama 2 vocabulary, so a toy that borrows the name is not one) or by its shape
    if ("tinyllama" in text and config.vocab_size == TINYLLAMA_SHAPE[0]) or shape == TINYLLAMA_SHAPE:
        return TinyLlama(version="1.1B" if shape == TINYLLAMA_SHAPE else size_label(params))
    if meta_version and (_meta_shape(config) or ("llama" in text and "meta" in text)):
        return MetaLlama(version=meta_version, size=size_label(params, meta=True))
    name = next((n for n in names if n), "llama")
    return Custom(name=name)


def _meta_version(c: LlamaConfig, text: str) -> str | None:
    """Llama 3 vs 3.1 vs 3.2 (and 3.3, 2) from vocab size, RoPE scaling and theta, names breaking ties."""
    s = c.rope_scaling
    if c.vocab_size == 128256 and c.rope_theta == 500000.0:
        if s is None:
            return "3"
        if s.rope_type == "llama3" and s.factor == 32.0:
            return "3.2"
        if s.rope_type == "llama3" and s.factor == 8.0:
            return "3.3" if re.search(r"3\.3|3-3", text) else "3.1"
    if c.vocab_size == 32000 and c.rope_theta == 10000.0 and ("llama-2" in text or "llama2" in text
                                                              or _meta_shape(c)):
        return "2"
    return None


def _meta_shape(c: LlamaConfig) -> bool:
    """Shapes of Meta's own releases (hidden, layers)."""
    return (c.hidden_size, c.num_hidden_layers) in {
        (2048, 16), (3072, 28), (4096, 32), (5120, 40), (8192, 80), (16384, 126)}


# --- WeightInfo and TokenizerInfo ------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorEntry:
    name: str  # as stored (GGUF names for GGUF files)
    dtype: str  # safetensors dtype name, or the GGML type name
    shape: tuple[int, ...]
    nbytes: int
    shard: str  # file name

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass(frozen=True)
class WeightInfo:
    tensors: list[TensorEntry]
    files: list[str]
    quantized: dict[str, str] = field(default_factory=dict)  # tensor -> how it is quantized

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def parameter_count(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def dtype_histogram(self) -> dict[str, int]:
        """Tensors per dtype."""
        return dict(sorted(Counter(t.dtype for t in self.tensors).items()))


@dataclass(frozen=True)
class TokenizerInfo:
    type: str  # "SentencePiece" | "BPE" | "Tiktoken" | "GGUF-embedded" | "none"
    source: str | None
    vocab_size: int | None
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    has_chat_template: bool


def _safetensors_weight_info(source: TensorSource) -> WeightInfo:
    tensors = [TensorEntry(n, i.dtype, i.shape, i.nbytes, i.path.name)
               for n, i in ((n, source.info(n)) for n in source.names())]
    quantized = {t.name: f"{t.dtype} (quantized checkpoint)" for t in tensors
                 if t.dtype not in ("F64", "F32", "F16", "BF16") and not t.name.endswith("weight_shape")}
    return WeightInfo(tensors, sorted(p.name for p in source.files), quantized)


def _gguf_weight_info(gguf: GGUFFile) -> WeightInfo:
    tensors = [TensorEntry(n, i.ggml_type.name, i.shape, i.nbytes, gguf.path.name) for n, i in gguf.tensors.items()]
    plain = {"F32", "F16", "BF16", "F64"}
    quantized = {t.name: f"GGUF {t.dtype} blocks" for t in tensors if t.dtype not in plain}
    return WeightInfo(tensors, [gguf.path.name], quantized)


def _folder_tokenizer_info(folder: Path, config: LlamaConfig) -> TokenizerInfo:
    """From the tokenizer files' headers and JSON, without building the tokenizer (files reached as load does)."""
    files = ModelFolder(folder)
    tc_path = files.file("tokenizer_config.json", TokenizerError)
    tc = read_json(tc_path, TokenizerError) if tc_path is not None else {}
    tc = tc if isinstance(tc, dict) else {}
    has_template = bool(tc.get("chat_template")) or files.file("chat_template.jinja", TokenizerError) is not None
    ids = (config.bos_token_id, config.eos_token_id[0] if config.eos_token_id else None, config.pad_token_id)
    path = files.file("tokenizer.json", TokenizerError)
    if path is not None:
        data = read_json(path, TokenizerError)
        model = data.get("model") if isinstance(data, dict) else None
        model = model if isinstance(model, dict) else {}
        vocab = model.get("vocab")
        added = data.get("added_tokens") if isinstance(data, dict) else None
        added_ids = {t["id"] for t in added if isinstance(t, dict) and isinstance(t.get("id"), int)} \
            if isinstance(added, list) else set()
        size = max(len(vocab) if isinstance(vocab, (dict, list)) else 0, max(added_ids, default=-1) + 1)
        kind = model.get("type")
        return TokenizerInfo("BPE" if kind == "BPE" else str(kind)[:40], "tokenizer.json", size, *ids, has_template)
    path = files.file("tokenizer.model", TokenizerError)
    if path is not None:
        raw = read_bytes(path, MAX_TOKENIZER_BYTES, TokenizerError)
        if re.match(rb"[A-Za-z0-9+/]+={0,2} \d+\n", raw[:64]):
            return TokenizerInfo("Tiktoken", "tokenizer.model", raw.count(b"\n") + 256, *ids, has_template)
        import sentencepiece

        try:
            size = sentencepiece.SentencePieceProcessor(model_proto=raw).get_piece_size()
        except (RuntimeError, OSError, ValueError) as e:
            raise TokenizerError(f"sentencepiece cannot load the model ({e})", path) from None
        return TokenizerInfo("SentencePiece", "tokenizer.model", size, *ids, has_template)
    return TokenizerInfo("none", None, None, *ids, has_template)


def _gguf_tokenizer_info(gguf: GGUFFile, config: LlamaConfig) -> TokenizerInfo:
    m = gguf.metadata
    if "tokenizer.ggml.model" not in m:
        return TokenizerInfo("none", None, None, None, None, None, False)
    tokens = m.get("tokenizer.ggml.tokens") or []
    return TokenizerInfo("GGUF-embedded", f"gguf:{m['tokenizer.ggml.model']}", len(tokens), config.bos_token_id,
                         config.eos_token_id[0] if config.eos_token_id else None, config.pad_token_id,
                         bool(m.get("tokenizer.chat_template")))


# --- compatibility ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BackendCompatibility:
    backend: str
    available: bool
    dtypes: list[str]
    note: str


def check_backends(quantization: QuantizationConfig | None,
                   weights: WeightInfo | None = None) -> list[BackendCompatibility]:
    """Which registered backends import here and which compute dtypes they offer for this model; for a GGUF
    model, which block types each reads in place (as the memory estimate counts them) and which it dequantizes."""
    blocks = {t.dtype for t in weights.tensors if t.dtype.startswith(("Q", "IQ"))} if weights else set()
    out = []
    for name in backends.names():
        try:
            backend = backends.backend_class(name)
        except BackendError as e:
            out.append(BackendCompatibility(name, False, [], f"not installed: {e}"))
            continue
        dtypes = [d.value for d in backend.dtypes]
        note = "runs the float weights"
        if quantization is not None:
            note = f"{quantization.method.value} {quantization.format}".strip()
            if quantization.method.value == "gguf":
                kept, converted = sorted(blocks & backend.reads_as_stored), sorted(blocks - backend.reads_as_stored)
                parts = ([f"{', '.join(kept)} blocks read in place as stored"] if kept else []) + (
                    [f"{', '.join(converted)} dequantized to float32 at load"] if converted else [])
                note += ": " + "; ".join(parts) if parts else ""
        out.append(BackendCompatibility(name, True, dtypes, note))
    return out


def check_backend(backend: str, dtype: DataType | str) -> DataType:
    """The compute dtype, after the checks load makes: an unknown backend or dtype, or a dtype an installed backend
    does not compute in, raises BackendError (a backend not installed here is still estimated)."""
    try:
        compute = DataType.parse(dtype)
    except ValueError:
        raise BackendError(f"unknown compute dtype {dtype!r}") from None
    try:
        cls = backends.backend_class(backend)
    except BackendError:
        if backend not in backends.names():
            raise
        return compute
    if compute not in cls.dtypes:
        raise BackendError(f"the {backend} backend computes in {', '.join(d.value for d in cls.dtypes)}, "
                           f"not {compute.value}")
    return compute


# --- the diagnostic --------------------------------------------------------------------------------------------

@dataclass
class ModelDiagnostic:
    model_path: Path
    model_type: LlamaVariant
    config: LlamaConfig
    weight_info: WeightInfo
    tokenizer_info: TokenizerInfo
    quantization_config: QuantizationConfig | None
    supported_dtypes: list[DataType]
    memory_requirements: MemoryRequirements
    backends: list[BackendCompatibility] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # what load would reject (missing tensors, ...)
    memory_limit: int | None = None

    @classmethod
    def analyze_directory(cls, path: str | Path, backend: str = "numpy", dtype: DataType | str = DataType.F32,
                          context_length: int | None = None, batch_size: int = 1,
                          memory_limit: int | str | None = None) -> ModelDiagnostic:
        """Analyse an HF folder or a .gguf file from headers only. `memory_limit`: bytes, or a size with a unit
        ("16GB", "512MiB")."""
        path = Path(path).expanduser()
        dtype = check_backend(backend, dtype)
        for name, value in (("context_length", context_length), ("batch_size", batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InputError(f"{name} must be an integer >= 1, got {brief(value)}")
        memory_limit = None if memory_limit is None else parse_bytes(memory_limit)
        if path.is_file() and path.suffix == ".gguf":
            gguf = GGUFFile(path)
            config = config_from_gguf(gguf)
            weights = _gguf_weight_info(gguf)
            tokenizer = _gguf_tokenizer_info(gguf, config)
            names = [path.stem, str(gguf.metadata.get("general.name", ""))]
            problems = _gguf_problems(gguf, config)
        elif path.is_dir():
            config = LlamaConfig.from_dir(path)
            source = TensorSource(path)
            weights = _safetensors_weight_info(source)
            tokenizer = _folder_tokenizer_info(path, config)
            names = [config.name_or_path or "", path.resolve().name]
            problems = _folder_problems(source, config)
        else:
            raise CheckpointError("not a model folder or a .gguf file", path)
        memory = estimate(config, weights, backend, dtype, context_length, batch_size, memory_limit=memory_limit,
                          vocab_entries=tokenizer.vocab_size or 0)
        backends = check_backends(config.quantization_config, weights)
        supported = sorted({DataType(d) for b in backends if b.available for d in b.dtypes},
                           key=lambda d: list(DataType).index(d))
        return cls(path, detect_variant(config, names), config, weights, tokenizer, config.quantization_config,
                   supported, memory, backends, problems, memory_limit)

    @property
    def verdict(self) -> str:
        usable = [b for b in self.backends if b.available]
        if self.problems:
            return f"will not load: {self.problems[0]}"
        if not usable:
            return "no backend available: pip install refllama"
        need = self.memory_requirements.total_estimated
        if self.memory_limit is not None and need > self.memory_limit:
            return f"does not fit the memory limit ({format_bytes(need)} > {format_bytes(self.memory_limit)})"
        names = ", ".join(f"{b.backend} ({'/'.join(b.dtypes)})" for b in usable)
        return f"loads and runs on {names}"

    def to_json(self) -> dict[str, Any]:
        """The documented, stable JSON form (docs/inspect.md); schema_version changes when a field does."""
        m = self.memory_requirements
        variant = self.model_type
        return {
            "schema_version": SCHEMA_VERSION,
            "model_path": str(self.model_path),
            "model_type": {"kind": type(variant).__name__, **asdict(variant)},
            "config": {**self.config.__dict__, "hidden_act": self.config.hidden_act.value,
                       "moe": None if self.config.moe is None else {
                           **asdict(self.config.moe), "router": self.config.moe.router.value},
                       "default_dtype": self.config.default_dtype.value,
                       "rope_scaling": asdict(self.config.rope_scaling) if self.config.rope_scaling else None,
                       "quantization_config": None, "layer_dtypes": None,
                       "eos_token_id": list(self.config.eos_token_id),
                       "rope_freq_factors": list(self.config.rope_freq_factors or []) or None},
            "weights": {"files": self.weight_info.files, "tensor_count": len(self.weight_info.tensors),
                        "parameter_count": self.weight_info.parameter_count,
                        "config_parameter_count": parameter_count(self.config),
                        "active_parameter_count": parameter_count(self.config, active=True),
                        "total_bytes": self.weight_info.total_bytes,
                        "dtype_histogram": self.weight_info.dtype_histogram,
                        "quantized_tensors": len(self.weight_info.quantized)},
            "tokenizer": asdict(self.tokenizer_info),
            "quantization": None if self.quantization_config is None else {
                "method": self.quantization_config.method.value, "format": self.quantization_config.format},
            "supported_dtypes": [d.value for d in self.supported_dtypes],
            "memory": {"backend": m.backend, "dtype": m.dtype.value, "context_length": m.context_length,
                       "batch_size": m.batch_size, "model_weights": m.model_weights, "kv_cache": m.kv_cache,
                       "activation_memory": m.activation_memory, "runtime_overhead": m.runtime_overhead,
                       "total_estimated": m.total_estimated,
                       "recommendations": [{"kind": type(r).__name__, **{k: (v.name if isinstance(v, DataType)
                                                                             else v) for k, v in asdict(r).items()}}
                                           for r in m.recommendations]},
            "backends": [asdict(b) for b in self.backends],
            "problems": self.problems,
            "memory_limit": self.memory_limit,
            "verdict": self.verdict,
        }


def _shape_problems(source: TensorSource | GGUFTensorSource, config: LlamaConfig) -> list[str]:
    """Missing and misshapen tensors, from the headers (load_weight_map checks the same, and more, at load)."""
    source = text_model(source)
    present = {n: source.info(n).shape for n in source.names()}
    expected = expected_shapes(config, stored_stacked(config, set(present)))  # lm_head left out when tied
    return [f"missing tensor {n}" for n in sorted(set(expected) - set(present))] + [
        f"{n} has shape {list(present[n])}, the config needs {list(s)}"
        for n, s in expected.items() if n in present and present[n] != s]


def _folder_problems(source: TensorSource, config: LlamaConfig) -> list[str]:
    if config.quantization_config is not None:
        return []  # quantized layouts are checked by the quantization loader at load time
    return _shape_problems(source, config)


def _gguf_problems(gguf: GGUFFile, config: LlamaConfig) -> list[str]:
    try:
        return _shape_problems(GGUFTensorSource(gguf, config), config)
    except RefLlamaError as e:
        return [str(e)]


# --- verification (opt-in: reads every byte) -------------------------------------------------------------------

@dataclass(frozen=True)
class VerificationReport:
    checked_tensors: int
    nonfinite: dict[str, int]  # tensor -> count of NaN/Inf values
    checksums: dict[str, str]  # file -> "ok" | "MISMATCH" | "not in manifest"
    manifest: str | None

    @property
    def ok(self) -> bool:
        return not self.nonfinite and all(v != "MISMATCH" for v in self.checksums.values())


def verify(path: str | Path) -> VerificationReport:
    """Shapes and dtypes (as load checks them), a NaN/Inf scan of every float tensor, and each file's sha256
    against a `SHA256SUMS` manifest (sha256sum format) in the folder when there is one."""
    path = Path(path).expanduser()
    if path.suffix == ".gguf":
        gguf = GGUFFile(path)
        names = list(gguf.tensors)

        def read(n: str) -> np.ndarray:
            return gguf.get(n) if gguf.tensors[n].ggml_type != GGMLType.BF16 else gguf.dequantize(n)
        folder, files = path.parent, [path]
    else:
        source = TensorSource(path)
        names, read, folder, files = source.names(), source.get, path, sorted(source.files)
    nonfinite = {}
    for n in names:
        a = read(n)
        if a.dtype.kind == "f" or str(a.dtype) in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
            bad = int(np.count_nonzero(~np.isfinite(a.astype(np.float32, copy=False))))
            if bad:
                nonfinite[n] = bad
    manifest_path = folder / "SHA256SUMS"
    expected: dict[str, str] = {}
    found = ModelFolder(folder).file("SHA256SUMS")
    if found is not None:
        text = read_bytes(found, 16 << 20).decode("utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                parts = line.split(maxsplit=1)
                if len(parts) != 2:
                    raise CheckpointError(f"line {number} is not 'sha256 name'", manifest_path)
                expected[parts[1].lstrip("*").strip()] = parts[0].lower()
    checksums = {}
    for f in files:
        if f.name in expected:
            checksums[f.name] = "ok" if _sha256(f) == expected[f.name] else "MISMATCH"
        elif expected:
            checksums[f.name] = "not in manifest"
    return VerificationReport(len(names), nonfinite, checksums, str(manifest_path) if expected else None)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
