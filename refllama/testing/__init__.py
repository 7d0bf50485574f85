"""Tools for using refllama as an oracle: compare metrics, tolerance profiles, tracing, pytest fixtures."""

from refllama.testing.compare import PROFILES, Profile, Report, assert_logits_close, check, compare

__all__ = ["PROFILES", "Profile", "Report", "assert_logits_close", "check", "compare"]
