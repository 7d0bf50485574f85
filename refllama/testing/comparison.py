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

from refllama.testing.traces import validate_trace


@dataclass(frozen=True)
class Profile:
    """Bounds for one kind of comparison; `calibration` says which measurements set them."""

    name: str
    max_abs: float  # at each position: max |diff| <= max_abs + max_rel * max |reference| (as numpy's allclose)
    nmse: float
    kl_mean: float
    top1_min: float  # agreement required at positions whose reference top-1/top-2 margin exceeds argmax_margin
    argmax_margin: float
    calibration: str
    max_rel: float = 0.0

    def max_abs_bound(self, reference_scale: np.ndarray) -> np.ndarray:
        """The max |diff| allowed at each position, given max |reference| there."""
        return self.max_abs + self.max_rel * reference_scale


PROFILES: dict[str, Profile] = {
    "f64": Profile("f64", 1e-9, 1e-18, 1e-15, 1.0, 1e-9,
                   "refllama numpy float64 vs transformers patched to true float64: max |diff| 6.8e-15 on the "
                   "tiny fixtures, 9.1e-14 on SmolLM2-135M"),
    "f32": Profile("f32", 2e-4, 1e-9, 1e-8, 1.0, 1e-3,
                   "float32 engines vs transformers float32 on SmolLM2-135M, natural prompts: numpy max 6.5e-5, "
                   "NMSE <= 2.6e-12, mean KL <= 2.3e-11; MLX max 1.1e-4; llama.cpp f32 with an f32 KV cache <= "
                   "1.5e-4. refllama numpy float32 vs float64 on SmolLM2, natural and adversarial ids (BOS only, "
                   "BOS x32, one token x64, 64 random ids, 64 random ids from the vocabulary's top, special ids "
                   "[1, 2, 3, 4], 264 natural tokens): max 4.8e-5 to 1.2e-4, but 7.1e-4 on [1, 2, 3, 4] (logit "
                   "scale 22: max |diff| / max |ref| 3.2e-5, against <= 4.1e-6 elsewhere), NMSE <= 5.1e-10, "
                   "mean KL <= 1.7e-9; hence the relative term 1e-4 x max |ref|",
                   max_rel=1e-4),
    "bf16": Profile("bf16", 3.0, 1e-2, 1e-2, 0.9, 1e-3,
                    "bfloat16 compute vs float32 on SmolLM2-135M: MLX bf16 max 1.17, NMSE 2.4e-3, mean KL 2.5e-3, "
                    "top-1 0.97-1.0; transformers bf16 vs f32 max 0.64-1.56"),
    "int8": Profile("int8", 0.5, 1e-3, 1e-3, 0.95, 1e-3,
                    "W8A8 with the same activation semantics: an independent engine vs transformers 2e-6, or 0.11 "
                    "when the -127.5 rounding tie flips one code (refllama/quant/int8.py)"),
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
    ref_scale: np.ndarray  # max |reference|
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
        kl=kl, top1_agree=agree, topk_contained=contained, margin=margin, ref_scale=np.abs(ref).max(axis=-1),
        nmse=float(((ref - cand) ** 2).sum() / max((ref**2).sum(), np.finfo(np.float64).tiny)), k=k,
    )


def check(report: Report, profile: str | Profile) -> list[str]:
    """The profile's bounds that `report` breaks, as readable lines (empty when it passes)."""
    p = PROFILES[profile] if isinstance(profile, str) else profile
    failures = []
    over = report.max_abs - p.max_abs_bound(report.ref_scale)
    if (over > 0).any():
        worst = int(over.argmax())
        bound = float(p.max_abs_bound(report.ref_scale[worst]))
        failures.append(f"max |diff| {report.max_abs[worst]:.3g} > {bound:.3g}"
                        f" at position {worst}" + (f" ({p.max_abs:g} + {p.max_rel:g} x max |ref| "
                                                   f"{report.ref_scale[worst]:.3g})" if p.max_rel else ""))
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
    """One tensor of `compare_traces`: its metrics against the reference, and whether they are within the
    profile. A tensor the candidate lacks (with `allow_missing`) has `missing` set, NaN metrics and ok True."""

    name: str
    max_abs: float
    rel_max_abs: float  # max |diff| / max |reference|
    nmse: float
    ok: bool
    missing: bool = False


def compare_traces(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray],
                   profile: str | Profile = "f32", *, allow_missing: bool = False) -> list[TraceRow]:
    """Tensor-by-tensor comparison of two traces (engine.trace, `refllama trace`), in the reference's order.

    The candidate must have every tensor of the reference, in the reference's shape: TraceFormatError names each
    wrong shape and each missing tensor (`allow_missing` turns the latter into `missing` rows, for engines that
    cannot dump everything). An intermediate is within the profile when its NMSE is (scale-free, as llama.cpp's
    per-op checks); the logits must also pass the profile's other bounds. docs/trace-format.md has the format.
    """
    p = PROFILES[profile] if isinstance(profile, str) else profile
    expected = {name: np.shape(value) for name, value in reference.items()}
    missing = set(validate_trace(candidate, expected, allow_missing=allow_missing, source="candidate trace"))
    rows = []
    for name, ref in reference.items():
        if name.endswith(ROUTING_SUFFIXES):
            continue  # expert choices are compared by expert_agreement
        if name in missing:
            rows.append(TraceRow(name, float("nan"), float("nan"), float("nan"), True, missing=True))
            continue
        report = compare(ref, candidate[name])
        ok = report.nmse <= p.nmse and (name != "logits" or not check(report, p))
        scale = float(np.abs(ref).max()) or 1.0
        rows.append(TraceRow(name, report.max_abs_diff, report.max_abs_diff / scale, report.nmse, ok))
    return rows


def _positions_first(name: str, value: np.ndarray) -> np.ndarray:
    """A trace tensor as (T, -1): q, k and v carry positions on axis 1 (heads, T, head_dim), the rest on axis 0."""
    value = np.asarray(value, dtype=np.float64)
    if name.rsplit(".", 1)[-1] in ("q", "k", "v"):
        value = value.swapaxes(0, 1)
    return value.reshape(value.shape[0], -1)


def _where(position: int, decode_from: int) -> str:
    return (f"position {position} (prefill)" if position < decode_from else
            f"position {position} (decode step {position - decode_from} through the KV cache)")


def assert_cached_matches_full(full: dict[str, np.ndarray] | np.ndarray, cached: dict[str, np.ndarray] | np.ndarray,
                               decode_from: int, profile: str | Profile = "f32") -> Report:
    """The KV-cache path against one full forward pass over the same ids: AssertionError naming the first
    position (and, for traces, the first tensor) beyond the profile; the logits' Report otherwise.

    `full` and `cached` are logits (T, vocab) or traces (engine.trace(ids) and engine.trace(ids, decode_from=n)):
    in `cached`, ids[:n] were one prefill and every later id a one-token step through the cache. The full pass
    may come from the reference and the cached one from the engine under test, or both from the same engine.

    Caveat: with dynamic NTK RoPE scaling, once the sequence passes max_position_embeddings the two paths
    legitimately differ (cached keys keep the table of the step that wrote them, as in transformers); keep such
    sequences within max_position_embeddings.
    """
    p = PROFILES[profile] if isinstance(profile, str) else profile
    name = p.name
    if isinstance(full, dict) != isinstance(cached, dict):
        raise TypeError("full and cached must both be traces (dicts) or both logits arrays")
    if isinstance(full, dict):
        rows = compare_traces(full, cached, p)
        first = next((r for r in rows if not r.ok), None)
        if first is not None:
            ref, cand = _positions_first(first.name, full[first.name]), _positions_first(first.name, cached[first.name])
            nmse = ((ref - cand) ** 2).sum(-1) / np.maximum((ref**2).sum(-1), np.finfo(np.float64).tiny)
            bad = np.flatnonzero(nmse > p.nmse)
            where = _where(int(bad[0]), decode_from) if bad.size else "no single position"
            raise AssertionError(f"the cached path diverges from the full pass beyond the '{name}' profile first at "
                                 f"'{first.name}' (NMSE {first.nmse:.3g} > {p.nmse:g}), first at {where}")
        full, cached = full["logits"], cached["logits"]
    report = compare(full, cached)
    failures = check(report, p)
    if failures:
        bad = np.flatnonzero((report.max_abs > p.max_abs_bound(report.ref_scale)) | (report.nmse_per_position > p.nmse)
                             | (report.kl > p.kl_mean))
        where = _where(int(bad[0]), decode_from) if bad.size else "no single position"
        raise AssertionError(f"cached logits differ from the full pass beyond the '{name}' profile, first at "
                             f"{where}: " + "; ".join(failures) + f"\n{report}")
    return report


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
