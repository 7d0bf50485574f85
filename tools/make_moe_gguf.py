"""Convert the tiny Mixtral fixture to GGUF with llama.cpp's own converter (tests/fixtures/gguf_moe/).

llama.cpp's `convert_hf_to_gguf.py` writes Mixtral as a `llama` file with stacked experts (`ffn_*_exps`), a float32
router (`ffn_gate_inp`) and q/k permuted. The converter needs a tokenizer, so a 64-piece SentencePiece model is
trained first (the fixture has none). The fixture is `mixtral_bf16`: the converter does not carry Mixtral's
sliding window (llama.cpp's `llama` architecture has none), and that fixture has no window.

    python tools/make_moe_gguf.py --llama-cpp /path/to/llama.cpp   # a checkout, or llama-cpp-python's sdist
                                                                  # vendor/llama.cpp (its gguf-py is used)
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-cpp", type=Path, required=True, help="folder holding convert_hf_to_gguf.py")
    args = parser.parse_args()
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
