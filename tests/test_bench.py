"""tools/bench.py's own arithmetic, without its peers: the weight bytes a decode step streams, the memory bound and
its share, the targets and how they print, --quick's settings, the scoring prompts and cross-check, and the read
bandwidth kernel on a small buffer. About 5 s, most of it loading two tiny fixtures and compiling one kernel."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import refllama
from refllama.diagnostics import benchmark
from refllama.formats.gguf import GGUFFile
from refllama.testing.golden import SMOLLM2_ATOL

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(ROOT / "tools"))
import bench  # noqa: E402


def info(shape: tuple[int, ...], nbytes: int) -> SimpleNamespace:
    return SimpleNamespace(shape=shape, nbytes=nbytes)


def test_gguf_matrix_bytes_count_the_embedding_only_as_a_tied_head():
    tensors = {"token_embd.weight": info((100, 8), 3200), "blk.0.attn_q.weight": info((8, 8), 256),
               "blk.0.attn_norm.weight": info((8,), 32)}
    assert bench.gguf_matrix_bytes(tensors) == 3200 + 256  # tied: the table is the output matrix
    tensors["output.weight"] = info((100, 8), 1000)
    assert bench.gguf_matrix_bytes(tensors) == 1000 + 256  # untied: only the rows looked up, left out


def test_streamed_weight_bytes_of_a_dense_model():
    engine = refllama.load(FIXTURES / "llama32", backend="numpy", dtype="float32")
    c = engine.config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    per_layer = c.hidden_size * (2 * q + 2 * kv) + 3 * c.hidden_size * c.intermediate_size
    expected = 4 * (c.num_hidden_layers * per_layer + c.vocab_size * c.hidden_size)  # float32; tied head
    assert benchmark.streamed_weight_bytes(engine) == expected


def test_streamed_weight_bytes_of_a_gguf_moe_count_top_k_of_the_experts():
    path = FIXTURES / "gguf_moe" / "mixtral-f32.gguf"
    engine = refllama.load(path, backend="numpy", dtype="float32")
    tensors = GGUFFile(path).tensors
    experts = {k: v for k, v in tensors.items() if "_exps" in k}
    dense = bench.gguf_matrix_bytes({k: v for k, v in tensors.items() if k not in experts})
    moe = engine.config.moe
    expected = dense + sum(v.nbytes for v in experts.values()) * moe.top_k // moe.num_experts
    assert experts and benchmark.streamed_weight_bytes(engine) == expected


def test_bound_and_its_share():
    rows = {"refllama numba f32": {"decode_tokens_per_s": 50.0, "weight_bytes_per_token": 500_000_000},
            "HF torch f32": {"decode_tokens_per_s": 20.0}}  # no byte count: no bound
    found = bench.bounds(rows, 30.0)
    assert found.keys() == {"refllama numba f32"}
    assert found["refllama numba f32"]["bound_tokens_per_s"] == pytest.approx(60.0)
    assert found["refllama numba f32"]["fraction"] == pytest.approx(50 / 60)
    assert bench.bounds(rows, None) == {}


def report() -> dict:
    rows = {"refllama numba f32": {"prefill_tokens_per_s": 600.0, "decode_tokens_per_s": 50.0},
            "llama.cpp f32": {"prefill_tokens_per_s": 500.0, "decode_tokens_per_s": 49.0},
            "refllama numba Q8_0": {"prefill_tokens_per_s": 500.0, "decode_tokens_per_s": 90.0},
            "llama.cpp q8_0": {"prefill_tokens_per_s": 700.0, "decode_tokens_per_s": 100.0},
            "HF torch f32": {"prefill_tokens_per_s": 700.0, "decode_tokens_per_s": 20.0}}
    scoring = {"refllama numba f32": {"tokens_per_s": 800.0, "valid": False}, "HF torch f32": {"tokens_per_s": 600.0}}
    return {"rows": rows, "scoring": scoring, "bounds": {"refllama numba f32": {"fraction": 0.9}},
            "busy": {"refllama numba Q8_0": {"kept": 0.3}},
            "q4_1_rss": {"peak_minus_base_mb": 180, "bound_mb": 133, "file_mb": 94, "kv_mb": 11, "met": False}}


def test_targets_compare_each_figure_with_its_minimum():
    found = {(t["row"], t["metric"], t["reference"]): t for t in bench.targets(report())}
    assert len(found) == len(bench.TARGETS)
    f32_decode = found[("refllama numba f32", "decode", "llama.cpp f32")]
    assert f32_decode["ratio"] == pytest.approx(50 / 49) and f32_decode["met"] is True
    q8 = found[("refllama numba Q8_0", "decode", "llama.cpp q8_0")]
    assert q8["ratio"] == pytest.approx(0.9) and q8["met"] is False
    assert found[("refllama numba f32", "prefill", "HF torch f32")]["met"] is False  # 600 / 700
    assert found[("refllama numba f32", "bound", None)]["met"] is True  # 90% >= 85%
    assert found[("refllama numba Q8_0", "busy", None)]["met"] is False  # 30% < 40%
    assert found[("refllama numba f32", "scoring", "HF torch f32")]["met"] is False  # faster, but wrong logits
    assert found[("refllama numba Q4_1", "rss", None)]["met"] is False  # grew 180 MiB against 133
    missing = found[("refllama numba Q4_1", "decode", "llama.cpp Q4_1")]
    assert missing["ratio"] is None and missing["met"] is None


def test_every_done_when_target_is_there():
    metrics = {(row, metric) for row, metric, _, _ in bench.TARGETS}
    for row in ("f32", "Q8_0", "Q4_1", "Q4_K_M", "W8A8"):
        assert (f"refllama numba {row}", "decode") in metrics and (f"refllama numba {row}", "prefill") in metrics
    assert {("refllama numba f32", "bound"), ("refllama numba f32", "scoring")} <= metrics
    assert all(minimum >= (0.85 if metric == "bound" else 0.4 if metric == "busy" else 1.0)
               for _, metric, _, minimum in bench.TARGETS)


def test_markdown_prints_each_target_met_or_not():
    r = report()
    r.update(machine={"cpu": "cpu", "cores": 2, "load_average": [1.0, 1.0, 1.0]}, profiles={},
             settings={"threads": 2, "prompt_tokens": 128, "new_tokens": 128, "rounds": 3, "reps": 1,
                       "scoring_prompts": 16, "scoring_tokens": 256, "scoring_reps": 1},
             bandwidth={"before": {"gb_per_s": 30.0}, "after": {"gb_per_s": 28.0}, "gb_per_s": 30.0,
                        "buffer_mib": 256})
    r["rows"]["refllama numba f32"].update(time_to_first_token_s=0.2, load_s=1.0, rss_loaded_mb=100,
                                           rss_peak_mb=200, rss_base_mb=50, weight_bytes_per_token=500_000_000)
    for name, seconds in (("refllama numba f32", 5.0), ("HF torch f32", 6.0)):
        r["scoring"][name].update(seconds=[seconds], shapes=[[256, 49152]], complete=True, how="per prompt")
    r["rows"] = {"refllama numba f32": r["rows"]["refllama numba f32"]}
    r["bounds"] = bench.bounds(r["rows"], 30.0)
    r["bounds"]["refllama numba f32"]["beside"] = {"fractions": [0.8, 0.5], "gb_per_s": [32.0, 55.0], "median": 0.65}
    r["ratios"], r["targets"] = bench.ratios(r["rows"], r["scoring"]), bench.targets(r)
    r["busy"] = {"refllama numba f32": {"quiet": 50.0, "busy": 25.0, "kept": 0.5, "quiet_ttft_s": 0.2,
                                        "busy_ttft_s": 0.5}}
    text = bench.markdown(r)
    assert "| refllama numba f32 | 600 | 50.0 | 500 | 60.0 | 83% |" in text
    assert "| refllama numba f32 decode >= 85% of its memory bound | 83% | not met |" in text
    assert "| refllama numba f32 (per prompt) | 800 | 5.00 | 256x49152 | yes |  | 1.33x |  |" in text
    assert "| refllama numba f32 | 50.0 | 25.0 | 50% | 200 | 500 |" in text
    assert "| refllama numba Q4_1 peak RSS over the baseline <= 1.3 x file + KV cache | the bound is 0.74x the " \
        "growth | not met |" in text
    assert "before 30.0 GB/s, after 28.0 GB/s" in text
    assert "round by round: 80% of 32.0, 50% of 55.0 GB/s; median 65%" in text
    assert "median of 3 rounds x 1" in text


def test_quick_settings_and_explicit_overrides():
    quick = bench.parse_args(["--quick"])
    assert (quick.rounds, quick.reps, quick.prompt_tokens, quick.scoring_prompts, quick.profile) == (1, 1, 32, 2, "")
    assert bench.parse_args(["--quick", "--reps", "2"]).reps == 2
    full = bench.parse_args([])
    assert (full.rounds, full.reps, full.prompt_tokens, full.new_tokens, full.scoring_prompts,
            full.scoring_tokens) == (3, 1, 128, 128, 16, 256)


def test_a_row_over_its_rounds_takes_the_median_of_every_repetition():
    """Each round is a fresh process; the row's throughputs are medians over all their repetitions, the rest is the
    first round's, and a failed round fails the row."""
    def rep(prefill_s, decode_s):
        return {"prefill_s": prefill_s, "decode_s": decode_s, "prefill_tokens_per_s": 128 / prefill_s,
                "decode_tokens_per_s": 127 / decode_s}

    rounds = [{"load_s": 1.0, "rss_peak_mb": 200, "repetitions": [rep(0.2, 1.0)]},
              {"load_s": 2.0, "rss_peak_mb": 300, "repetitions": [rep(0.4, 4.0)]},
              {"load_s": 3.0, "rss_peak_mb": 400, "repetitions": [rep(0.3, 2.0)]}]
    row = bench.over_rounds(rounds)
    assert (row["prefill_tokens_per_s"], row["decode_tokens_per_s"], row["time_to_first_token_s"]) == (
        128 / 0.3, 127 / 2.0, 0.3)
    assert (row["load_s"], row["rss_peak_mb"], row["rounds"], len(row["repetitions"])) == (1.0, 200, 3, 3)
    assert bench.over_rounds([rounds[0], {"error": "failed: x"}]) == {"error": "failed: x"}


def test_a_round_runs_each_refllama_row_next_to_its_peer(monkeypatch):
    """Every selected row once a round; a numba row next to the peer its ratio is taken against (Q8_0 and q8_0, Q4_1
    and Q4_1, f32 and f32), the other order every other round; MLX last."""
    rows = list(bench.ROWS)
    for round_ in range(4):
        order = bench.round_order(rows, round_)
        assert sorted(order) == sorted(rows) and order[-1] == "refllama mlx f32"
        for numba, peer in (("refllama numba Q8_0", "llama.cpp q8_0"), ("refllama numba Q4_1", "llama.cpp Q4_1"),
                            ("refllama numba Q4_K_M", "llama.cpp Q4_K_M"), ("refllama numba f32", "llama.cpp f32")):
            assert order.index(peer) - order.index(numba) == (1 if round_ % 2 == 0 else -1)
    picked = ["llama.cpp q8_0", "refllama numba Q8_0", "HF torch f32"]
    assert sorted(bench.round_order(picked, 0)) == sorted(picked)
    monkeypatch.setitem(bench.ROWS, "refllama numba fp8", ("refllama", "fp8", "fp8", "numba"))  # no peer: still runs
    assert bench.round_order([*picked, "refllama numba fp8"], 1)[-1] == "refllama numba fp8"


def test_scoring_prompts_are_deterministic_and_distinct():
    prompts = bench.scoring_prompts(list(range(100)), 16, 256)
    assert prompts == bench.scoring_prompts(list(range(100)), 16, 256)
    assert len(prompts) == 16 and {len(p) for p in prompts} == {256} and len({tuple(p) for p in prompts}) == 16


def test_cross_check_holds_refllama_to_the_bound(tmp_path):
    ref = np.random.default_rng(0).standard_normal((4, 10)).astype(np.float32)
    paths = {}
    for name, logits in {"HF torch f32": ref, "refllama numba f32": ref + SMOLLM2_ATOL / 2,
                         "refllama numpy f32": ref + 2 * SMOLLM2_ATOL, "llama.cpp f32": ref + 0.01}.items():
        paths[name] = tmp_path / f"{len(paths)}.npy"
        np.save(paths[name], logits)
    check = bench.cross_check(paths)
    assert check["refllama numba f32"]["within"] is True and check["refllama numpy f32"]["within"] is False
    assert check["llama.cpp f32"]["within"] is None and check["llama.cpp f32"]["max_abs_diff"] == pytest.approx(0.01)
    assert bench.cross_check({k: v for k, v in paths.items() if k != "HF torch f32"}) == {}


def test_read_bandwidth_sums_the_whole_buffer():
    pytest.importorskip("numba")
    result = benchmark.read_bandwidth(1, passes=2, buffer_mib=8)
    assert result["buffer_mib"] == 8 and len(result["gb_per_s_each"]) == 2
    assert result["gb_per_s"] == max(result["gb_per_s_each"]) > 0


def test_the_scoring_child_keeps_every_position_and_saves_the_first_prompt(tmp_path):
    prompts = bench.scoring_prompts(list(range(1, 60)), 3, 12)
    spec = {"task": "score", "engine": "refllama", "backend": "numpy", "path": str(FIXTURES / "llama32"),
            "prompts": prompts, "reps": 2, "threads": 1, "save": str(tmp_path / "first.npy")}
    result = bench.child(spec)
    assert result["complete"] and result["shapes"] == [(12, 64)] and result["tokens"] == 36
    assert len(result["seconds"]) == 2 and result["tokens_per_s"] > 0
    engine = refllama.load(FIXTURES / "llama32", backend="numpy", dtype="float32")
    np.testing.assert_array_equal(np.load(tmp_path / "first.npy"), engine.logits(np.array(prompts[0])))


def test_a_bound_row_is_also_read_against_the_bandwidth_beside_each_round():
    """Each round's decode over the bound of the higher reading taken right before and after it; the median is
    shown, the target keeps the run's highest reading. A round without readings is left out."""
    def rep(decode_s):
        return {"prefill_s": 0.2, "decode_s": decode_s, "prefill_tokens_per_s": 640.0,
                "decode_tokens_per_s": 127 / decode_s}

    rounds = [{"weight_bytes_per_token": 500_000_000, "repetitions": [rep(127 / 50), rep(127 / 52)],
               "bandwidth_beside": [30.0, 32.0]},
              {"repetitions": [rep(127 / 40)], "bandwidth_beside": [50.0, 48.0]},
              {"repetitions": [rep(127 / 45)]}]
    row = bench.over_rounds(rounds)
    assert row["round_decode_tokens_per_s"] == pytest.approx([51.0, 40.0, 45.0])
    found = bench.bounds({"refllama numba f32": row}, 50.0)["refllama numba f32"]
    assert found["fraction"] == pytest.approx(row["decode_tokens_per_s"] / 100.0)
    beside = found["beside"]
    assert beside["fractions"] == pytest.approx([51.0 / 64.0, 40.0 / 100.0]) and beside["gb_per_s"] == [32.0, 50.0]
    assert beside["median"] == pytest.approx((51.0 / 64.0 + 0.4) / 2)
    assert "beside" not in bench.bounds({"x": {**row, "bandwidth_beside": [[], [], []]}}, 50.0)["x"]
    assert bench.BESIDE_ROWS == ["refllama numba f32"]
