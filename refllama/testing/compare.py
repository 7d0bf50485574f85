"""Comparing logits (or hidden states) the way engine developers do, with tolerance profiles we measured.

Metrics, per position and overall: max and mean absolute difference; NMSE as llama.cpp's test-backend-ops
defines it (sum (a - b)^2 / sum a^2, a the reference); KL(P_ref || P_cand) of the softmax distributions; top-1
agreement; and top-k containment as vLLM's `check_logprobs_close` judges it (where the top-1 tokens differ, each
must be among the other's top k). For mixture-of-experts traces, `expert_agreement` compares the experts each
token chose, layer by layer, and names the first layer where routing differs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Profile:
    """Bounds for one kind of comparison; `calibration` says which measurements set them."""

    name: str
    max_abs: float
    nmse: float
    kl_mean: float
    top1_min: float  # agreement required at positions whose reference top-1/top-2 margin exceeds argmax_margin
    argmax_margin: float
    calibration: str


PROFILES: dict[str, Profile] = {
    "f64": Profile("f64", 1e-9, 1e-18, 1e-15, 1.0, 1e-9,
                   "refllama numpy float64 vs transformers patched to true float64: max |diff| 4.6e-15 on the "
                   "tiny fixtures, 9.1e-14 on SmolLM2-135M"),
    "f32": Profile("f32", 2e-4, 1e-9, 1e-8, 1.0, 1e-3,
                   "float32 engines vs transformers float32 on SmolLM2-135M: numpy max 6.5e-5, NMSE <= 2.6e-12, "
                   "mean KL <= 2.3e-11; MLX max 1.1e-4; llama.cpp f32 with an f32 KV cache <= 1.5e-4"),
    "bf16": Profile("bf16", 3.0, 1e-2, 1e-2, 0.9, 1e-3,
                    "bfloat16 compute vs float32 on SmolLM2-135M: MLX bf16 max 1.17, NMSE 2.4e-3, mean KL 2.5e-3, "
                    "top-1 0.97-1.0; transformers bf16 vs f32 max 0.64-1.56"),
    "int8": Profile("int8", 0.5, 1e-3, 1e-3, 0.95, 1e-3,
                    "W8A8 with the same activation semantics: an independent engine vs transformers 2e-6, or 0.11 "
                    "when the -127.5 rounding tie flips one code (shared/notes section 2)"),
    "q4": Profile("q4", 3.0, 2e-2, 5e-2, 0.95, 1e-3,
                  "4-bit kernels vs exact float32 dequantization: llama.cpp Q4_1 0.98-2.33 (top-1 97-98%), "
                  "transformers GPTQ/AWQ bf16 kernels 0.6-1.1 on SmolLM2-135M; the KL bound is not calibrated"),
}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@dataclass(frozen=True)
class Report:
    """Per-position metrics (arrays over positions) and their summaries."""

    max_abs: np.ndarray
    mean_abs: np.ndarray
    nmse_per_position: np.ndarray
    kl: np.ndarray
    top1_agree: np.ndarray
    topk_contained: np.ndarray
    margin: np.ndarray  # reference top-1 minus top-2
    nmse: float  # over everything
    k: int

    @property
    def positions(self) -> int:
        return len(self.max_abs)

    @property
    def max_abs_diff(self) -> float:
        return float(self.max_abs.max())

    @property
    def mean_abs_diff(self) -> float:
        return float(self.mean_abs.mean())

    @property
    def kl_mean(self) -> float:
        return float(self.kl.mean())

    @property
    def kl_max(self) -> float:
        return float(self.kl.max())

    @property
    def top1_agreement(self) -> float:
        return float(self.top1_agree.mean())

    @property
    def topk_containment(self) -> float:
        return float(self.topk_contained.mean())

    def top1_agreement_where_clear(self, margin: float) -> tuple[float, int]:
        """Agreement at positions whose reference margin exceeds `margin`, and how many near-ties were left out."""
        clear = self.margin > margin
        return (float(self.top1_agree[clear].mean()) if clear.any() else 1.0), int((~clear).sum())

    def __str__(self) -> str:
        return (f"{self.positions} positions: max |diff| {self.max_abs_diff:.3g} (worst position "
                f"{int(self.max_abs.argmax())}), mean |diff| {self.mean_abs_diff:.3g}, NMSE {self.nmse:.3g}, "
                f"KL mean {self.kl_mean:.3g} max {self.kl_max:.3g}, top-1 {self.top1_agreement:.3f}, "
                f"top-{self.k} containment {self.topk_containment:.3f}")


def compare(reference: np.ndarray, candidate: np.ndarray, k: int = 5) -> Report:
    """Compare two (..., vocab) logit arrays (or hidden states: the softmax metrics then still run on the last
    axis); leading axes are flattened into positions. Computed in float64."""
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    if ref.shape != cand.shape:
        raise ValueError(f"shapes differ: reference {ref.shape}, candidate {cand.shape}")
    ref = ref.reshape(-1, ref.shape[-1]) if ref.ndim else ref.reshape(1, 1)
    cand = cand.reshape(ref.shape)
    diff = np.abs(ref - cand)
    lp_ref, lp_cand = _log_softmax(ref), _log_softmax(cand)
    kl = np.maximum((np.exp(lp_ref) * (lp_ref - lp_cand)).sum(axis=-1), 0.0)
    k = min(k, ref.shape[-1])
    top_ref = np.argsort(-ref, axis=-1, kind="stable")[:, :k]
    top_cand = np.argsort(-cand, axis=-1, kind="stable")[:, :k]
    agree = top_ref[:, 0] == top_cand[:, 0]
    contained = agree | ((top_ref[:, :1] == top_cand).any(-1) & (top_cand[:, :1] == top_ref).any(-1))
    sorted_ref = np.sort(ref, axis=-1)
    margin = sorted_ref[:, -1] - (sorted_ref[:, -2] if ref.shape[-1] > 1 else -np.inf)
    denom = (ref**2).sum(axis=-1)
    return Report(
        max_abs=diff.max(axis=-1), mean_abs=diff.mean(axis=-1),
        nmse_per_position=((ref - cand) ** 2).sum(axis=-1) / np.where(denom > 0, denom, 1.0),
        kl=kl, top1_agree=agree, topk_contained=contained, margin=margin,
        nmse=float(((ref - cand) ** 2).sum() / max((ref**2).sum(), np.finfo(np.float64).tiny)), k=k,
    )


def check(report: Report, profile: str | Profile) -> list[str]:
    """The profile's bounds that `report` breaks, as readable lines (empty when it passes)."""
    p = PROFILES[profile] if isinstance(profile, str) else profile
    failures = []
    if report.max_abs_diff > p.max_abs:
        failures.append(f"max |diff| {report.max_abs_diff:.3g} > {p.max_abs:g} at position "
                        f"{int(report.max_abs.argmax())}")
    if report.nmse > p.nmse:
        failures.append(f"NMSE {report.nmse:.3g} > {p.nmse:g}")
    if report.kl_mean > p.kl_mean:
        failures.append(f"mean KL {report.kl_mean:.3g} > {p.kl_mean:g}")
    agreement, ties = report.top1_agreement_where_clear(p.argmax_margin)
    if agreement < p.top1_min:
        first = int(np.flatnonzero(~report.top1_agree & (report.margin > p.argmax_margin))[0])
        failures.append(f"top-1 agreement {agreement:.3f} < {p.top1_min:g} ({ties} near-ties excluded; first "
                        f"disagreement at position {first})")
    return failures


def assert_logits_close(reference: np.ndarray, candidate: np.ndarray, profile: str | Profile = "f32") -> Report:
    """AssertionError naming every broken bound of the profile (see PROFILES); returns the report otherwise."""
    report = compare(reference, candidate)
    failures = check(report, profile)
    if failures:
        name = profile if isinstance(profile, str) else profile.name
        raise AssertionError(f"logits differ beyond the '{name}' profile: " + "; ".join(failures) + f"\n{report}")
    return report


@dataclass(frozen=True)
class TraceRow:
    name: str
    max_abs: float
    rel_max_abs: float  # max |diff| / max |reference|
    nmse: float
    ok: bool


def compare_traces(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray],
                   profile: str | Profile = "f32") -> list[TraceRow]:
    """Tensor-by-tensor comparison of two traces (engine.trace, tools/hf_trace.py), in the reference's order.

    An intermediate is within the profile when its NMSE is (scale-free, as llama.cpp's per-op checks); the logits
    must also pass the profile's other bounds.
    """
    p = PROFILES[profile] if isinstance(profile, str) else profile
    rows = []
    for name, ref in reference.items():
        if name not in candidate or name.endswith(ROUTING_SUFFIXES):
            continue  # expert choices are compared by expert_agreement
        report = compare(ref, candidate[name])
        ok = report.nmse <= p.nmse and (name != "logits" or not check(report, p))
        scale = float(np.abs(ref).max()) or 1.0
        rows.append(TraceRow(name, report.max_abs_diff, report.max_abs_diff / scale, report.nmse, ok))
    return rows


ROUTING_SUFFIXES = (".experts", ".expert_weights")


@dataclass(frozen=True)
class RoutingRow:
    layer: int
    agreement: float  # fraction of tokens whose set of chosen experts is the same
    first_token: int | None  # the first token whose experts differ


def expert_agreement(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> list[RoutingRow]:
    """Per MoE layer (traces' `layers.N.experts`, (T, k)), how often both chose the same set of experts."""
    rows = []
    for name, ref in reference.items():
        if not (name.startswith("layers.") and name.endswith(".experts")) or name not in candidate:
            continue
        same = (np.sort(np.asarray(ref), axis=-1) == np.sort(np.asarray(candidate[name]), axis=-1)).all(axis=-1)
        differ = np.flatnonzero(~same.reshape(-1))
        rows.append(RoutingRow(int(name.split(".")[1]), float(same.mean()), int(differ[0]) if differ.size else None))
    return sorted(rows, key=lambda r: r.layer)
