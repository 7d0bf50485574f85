"""Decoding through the KV cache gives the logits of one full forward pass (property test)."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from conftest import FIXTURE_NAMES

TOLERANCE = {"float64": 1e-12, "float32": 2e-5}


@st.composite
def cases(draw):
    name = draw(st.sampled_from(FIXTURE_NAMES))
    dtype = draw(st.sampled_from(["float32", "float64"]))
    # Within max_position_embeddings: past it, dynamic NTK intentionally differs (test_golden covers that).
    n = draw(st.integers(1, 32))
    ids = draw(st.lists(st.integers(0, 63), min_size=n, max_size=n))
    # Split the sequence into chunks: a prefill then decode steps of 1 or more tokens.
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), max_size=n - 1))) if n > 1 else []
    return name, dtype, np.array(ids), cuts


@given(cases())
def test_cached_decoding_equals_full_forward(engines, case):
    name, dtype, ids, cuts = case
    engine = engines(name, dtype)
    full = engine.logits(ids)
    cache = engine.new_cache(1, len(ids) + 3)  # a cache larger than needed changes nothing
    pieces = np.split(ids, cuts)
    chunks = [engine.forward(piece[None], cache)[0] for piece in pieces]
    assert cache.length == len(ids)
    np.testing.assert_allclose(np.concatenate(chunks), full, rtol=0, atol=TOLERANCE[dtype])
