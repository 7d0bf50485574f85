"""Mixture-of-experts routing: which experts each token uses, and with what weight. Plain NumPy, on the host.

The router's logits come from the backend (a Linear in the compute dtype); turning them into a choice is done
here, once, for every backend, in the dtypes transformers uses:

* Mixtral (`Router.Softmax`): softmax over all experts in float32 (float64 when computing in float64), the top k
  of those probabilities, divided by their sum. The expert outputs are multiplied by these weights.
* Llama 4 (`Router.Sigmoid`): the top k of the raw logits, sigmoid of those (in float32, or float64), cast to the
  compute dtype. The expert *inputs* are multiplied by these weights.

Ties: `torch.topk` does not define which of two equal scores wins (CPU and CUDA differ). refllama's rule is
stated and tested: the lower expert index wins (a stable sort). `Routing.margin` is the gap between the k-th and
the (k+1)-th score, so a comparison can skip tokens whose choice is a near-tie.

Shapes: N tokens (batch x positions), E experts, k experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refllama.config import MoEConfig, Router


@dataclass(frozen=True)
class Routing:
    experts: np.ndarray  # (N, k) int64: the chosen experts, best first
    weights: np.ndarray  # (N, k) the weight of each chosen expert (compute dtype, at least float32)
    margin: np.ndarray  # (N,) score of the k-th choice minus the (k+1)-th (inf when k = E)

    def active_experts(self) -> list[int]:
        """The experts at least one token chose, ascending: the order their outputs are summed in."""
        return [int(e) for e in np.unique(self.experts)]

    def tokens(self, expert: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows (tokens, ascending) that chose `expert`, and the slot (0..k-1) it holds in each row."""
        return np.nonzero(self.experts == expert)


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (N, k) of the k largest scores per row, largest first, the lower index winning ties; and the
    margin (N,) between the k-th and (k+1)-th largest."""
    order = np.argsort(-scores, axis=-1, kind="stable")  # (N, E): a stable sort keeps equal scores in index order
    ranked = np.take_along_axis(scores, order, axis=-1)
    margin = ranked[:, k - 1] - ranked[:, k] if scores.shape[-1] > k else np.full(len(scores), np.inf)
    return order[:, :k], margin


def route(logits: np.ndarray, moe: MoEConfig) -> Routing:
    """Router logits (N, E) in the compute dtype -> the routing of every token."""
    work = np.promote_types(logits.dtype, np.float32)  # HF's `.float()`, or float64 when computing in it
    if moe.router is Router.Softmax:
        z = logits.astype(work)
        z = np.exp(z - z.max(axis=-1, keepdims=True))
        probs = z / z.sum(axis=-1, keepdims=True)  # (N, E)
        experts, margin = top_k(probs, moe.top_k)
        weights = np.take_along_axis(probs, experts, axis=-1)
        return Routing(experts, weights / weights.sum(axis=-1, keepdims=True), margin)
    experts, margin = top_k(logits, moe.top_k)
    top = np.take_along_axis(logits, experts, axis=-1).astype(work)
    return Routing(experts, (1.0 / (1.0 + np.exp(-top))).astype(logits.dtype), margin)
