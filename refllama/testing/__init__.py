"""Tools for using refllama as an oracle: compare metrics, tolerance profiles, traces, pytest fixtures."""

from refllama.testing.comparison import (
    PROFILES,
    Profile,
    Report,
    TraceRow,
    assert_cached_matches_full,
    assert_logits_close,
    check,
    compare,
    compare_traces,
    expert_agreement,
)
from refllama.testing.golden import golden_fixture_names
from refllama.testing.traces import (
    TraceDims,
    TraceFormatError,
    expected_shapes,
    load_trace,
    save_trace,
    trace_names,
    validate_trace,
)

__all__ = ["PROFILES", "Profile", "Report", "TraceDims", "TraceFormatError", "TraceRow",
           "assert_cached_matches_full", "assert_logits_close", "check", "compare", "compare_traces",
           "expected_shapes", "expert_agreement", "golden_fixture_names", "load_trace", "save_trace", "trace_names",
           "validate_trace"]
