"""The pictures of docs/walkthrough.md, from SmolLM2 itself (the embedded default model, float32, numpy backend).

    python tools/walkthrough_figures.py [OUT_DIR]      # default: docs/img

* attention.png: the attention weights of one head over a sentence (which earlier token each token reads);
* rope.png: RoPE's rotation frequency of each pair of dimensions, and the cosine it applies across positions;
* next_token.png: the probability of the ten most likely next tokens after "The capital of France is".

Every number comes from `engine.trace` (the model's own intermediates) or `refllama.model.rope`; nothing is
recomputed differently from the forward pass.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SENTENCE = "The cat sat on the mat because it was tired."
PROMPT = "The capital of France is"
LAYER, HEAD = 4, 1  # a head whose pattern is easy to read: most tokens attend to a few earlier ones


def attention_weights(trace: dict[str, np.ndarray], layer: int, head: int, groups: int) -> np.ndarray:
    """softmax(q k^T / sqrt(D)) with the causal mask, for one query head: (T, T); query head h reads KV head
    h // groups (grouped-query attention), as refllama.model.ops.attention does."""
    q = trace[f"layers.{layer}.q"][head].astype(np.float64)  # (T, D), after RoPE
    k = trace[f"layers.{layer}.k"][head // groups].astype(np.float64)  # (T, D)
    scores = q @ k.T / np.sqrt(q.shape[-1])  # (T, T)
    scores[np.triu_indices_from(scores, k=1)] = -np.inf  # a token sees itself and what came before
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return weights / weights.sum(axis=-1, keepdims=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", type=Path, default=ROOT / "docs" / "img", help="where the PNGs go")
    out = parser.parse_args(argv).out_dir
    out.mkdir(parents=True, exist_ok=True)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import refllama
    from refllama.model import rope

    engine = refllama.load(dtype="float32")
    c, tok = engine.config, engine.tokenizer

    # 1. one attention head over a sentence
    ids = tok.encode(SENTENCE)
    labels = [tok.decode([i]) for i in ids]
    weights = attention_weights(engine.trace(ids), LAYER, HEAD, c.num_attention_heads // c.num_key_value_heads)
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    image = ax.imshow(weights, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(ids)), labels, rotation=90)
    ax.set_yticks(range(len(ids)), labels)
    ax.set_xlabel("key: the token read")
    ax.set_ylabel("query: the token reading")
    ax.set_title(f"layer {LAYER}, head {HEAD}: attention weights (each row sums to 1)", fontsize=10)
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(out / "attention.png", dpi=100)
    plt.close(fig)

    # 2. RoPE: a frequency per pair of dimensions, and cos(position x frequency)
    freqs = rope.inv_freq(c)  # (head_dim / 2,)
    cos, _ = rope.cos_sin(c, np.arange(64)[None])  # (1, 64, head_dim)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.semilogy(freqs, marker=".")
    left.set_xlabel("dimension pair i (of head_dim / 2)")
    left.set_ylabel("radians per position")
    left.set_title(f"RoPE frequencies, theta = {c.rope_theta:g}", fontsize=10)
    image = right.imshow(cos[0, :, : c.head_dim // 2].T, aspect="auto", cmap="RdBu", vmin=-1, vmax=1)
    right.set_xlabel("position")
    right.set_ylabel("dimension pair i")
    right.set_title("cos(position x frequency): fast pairs first, slow below", fontsize=10)
    fig.colorbar(image, ax=right)
    fig.tight_layout()
    fig.savefig(out / "rope.png", dpi=100)
    plt.close(fig)

    # 3. the next-token distribution
    logits = engine.logits(tok.encode(PROMPT))[-1].astype(np.float64)  # (vocab,)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    top = np.argsort(-probs)[:10]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.bar(range(10), probs[top])
    ax.set_xticks(range(10), [repr(tok.decode([int(i)])) for i in top], rotation=45, ha="right")
    ax.set_ylabel("probability")
    ax.set_title(f"after {PROMPT!r}: the ten most likely next tokens", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "next_token.png", dpi=100)
    plt.close(fig)
    for name in ("attention.png", "rope.png", "next_token.png"):
        print(out / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
