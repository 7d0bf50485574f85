"""Tools for using refllama as an oracle: compare metrics, tolerance profiles, traces, pytest fixtures."""

from refllama.testing.compare import (
    PROFILES,
    Profile,
    Report,
    TraceRow,
    assert_cached_matches_full,
    assert_logits_close,
    check,
    compare,
    compare_traces,
)
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
           "expected_shapes", "load_trace", "save_trace", "trace_names", "validate_trace"]
