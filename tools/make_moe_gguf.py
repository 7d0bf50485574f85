"""Convert the tiny Mixtral fixture to GGUF with llama.cpp's own converter (tests/fixtures/gguf_moe/).

llama.cpp's `convert_hf_to_gguf.py` writes Mixtral as a `llama` file with stacked experts (`ffn_*_exps`), a float32
router (`ffn_gate_inp`) and q/k permuted. The converter needs a tokenizer, so a 64-piece SentencePiece model is
trained first (the fixture has none). The fixture is `mixtral_bf16`: the converter does not carry Mixtral's
sliding window (llama.cpp's `llama` architecture has none), and that fixture has no window.

    python tools/make_moe_gguf.py --llama-cpp /path/to/llama.cpp   # a checkout, or llama-cpp-python's sdist
                                                                  # vendor/llama.cpp (its gguf-py is used)
    python tools/make_moe_gguf.py --llama-cpp-logits               # golden/gguf_moe_llamacpp.npz from
                                                                  # llama-cpp-python (the [bench] extra)

The llama.cpp golden holds llama.cpp's own logits for the golden length-48 sequence of `mixtral_bf16` and its
16-token greedy continuation of the length-10 one, for each file, with a float32 KV cache and one thread.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "gguf_moe"
SOURCE = ROOT / "tests" / "fixtures" / "mixtral_bf16"
OUTTYPES = ("f32", "q8_0")


def tokenizer_model(folder: Path) -> Path:
    """A 64-piece SentencePiece BPE model (ids 0 unk, 1 bos, 2 eos, as the fixture's config)."""
    import sentencepiece as spm

    text = folder / "corpus.txt"
    text.write_text("\n".join(["the quick brown fox jumps over the lazy dog " * 3, "a bad cat ate the hat",
                               "mixture of experts routes tokens"] * 50))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(folder / "tokenizer"), vocab_size=64,
                                   model_type="bpe", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
                                   pad_id=-1, num_threads=1, minloglevel=2)
    return folder / "tokenizer.model"


def llama_cpp_golden() -> Path:
    """llama.cpp's logits and greedy tokens on the committed GGUF files (llama-cpp-python)."""
    import hashlib
    import json
    from importlib import metadata

    import llama_cpp
    import numpy as np

    with np.load(ROOT / "golden" / "mixtral_bf16.npz") as g:
        ids, prompt = g["ids_48"].tolist(), g["ids_10"].tolist()
    out = {"ids_48": np.array(ids), "ids_10": np.array(prompt)}
    for outtype in OUTTYPES:
        llm = llama_cpp.Llama(str(OUT / f"mixtral-{outtype}.gguf"), n_ctx=64, n_threads=1, n_batch=64,
                              logits_all=True, verbose=False, type_k=0, type_v=0)  # 0: GGML_TYPE_F32
        llm.eval(ids)
        out[f"logits_48_{outtype}"] = np.array(llm.scores[:len(ids)], dtype=np.float32)
        llm.reset()
        tokens = []
        for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            tokens.append(token)
            if len(tokens) == 16:
                break
        out[f"greedy_{outtype}"] = np.array(tokens, dtype=np.int64)
    path = ROOT / "golden" / "gguf_moe_llamacpp.npz"
    np.savez_compressed(path, **out)
    manifest_path = ROOT / "golden" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["moe_gguf_llamacpp"] = {
        "description": "llama.cpp's logits (float32 KV cache, one thread) for golden/mixtral_bf16.npz's ids_48 and its "
                       "16-token greedy continuation of ids_10, on tests/fixtures/gguf_moe/*.gguf",
        "golden": "golden/gguf_moe_llamacpp.npz",
        "golden_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "llama_cpp_python": metadata.version("llama-cpp-python"),
        "gguf_sha256": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(OUT.glob("*.gguf"))},
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--llama-cpp", type=Path, help="folder holding convert_hf_to_gguf.py")
    group.add_argument("--llama-cpp-logits", action="store_true", help="write llama.cpp's golden for the files")
    args = parser.parse_args()
    if args.llama_cpp_logits:
        print("wrote", llama_cpp_golden().relative_to(ROOT))
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "mixtral_bf16"
        shutil.copytree(SOURCE, model)
        shutil.copy(tokenizer_model(Path(tmp)), model / "tokenizer.model")
        env = {**os.environ, "PYTHONPATH": str(args.llama_cpp / "gguf-py")}
        for outtype in OUTTYPES:
            out = OUT / f"mixtral-{outtype}.gguf"
            subprocess.run([sys.executable, str(args.llama_cpp / "convert_hf_to_gguf.py"), str(model),
                            "--outtype", outtype, "--outfile", str(out)], check=True, env=env)
            print("wrote", out.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
