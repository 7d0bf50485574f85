"""Weights in huge pages (refllama/formats/hugepages.py): the arena's copies are the same bytes, read-only and
aligned, in memory advised MADV_HUGEPAGE; the numba backend copies there the matrices it streams that view the model
file, the GGUF loader makes its reordered q/k rows there, and REFLLAMA_HUGE_PAGES=0 leaves them mapped. (~2 s)"""

from __future__ import annotations

import gc
import sys

import ml_dtypes
import numpy as np
import pytest

from refllama.backends.numpy_backend import NumpyBackend
from refllama.formats import hugepages
from refllama.formats.files import map_file
from refllama.formats.safetensors import release_pages
from refllama.loading import take_weights
from refllama.model.weights import WeightMap


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping holding `address`, from /proc/self/smaps."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(v, 16) for v in head.split("-"))
            inside = start <= address < end
        elif inside and head == "VmFlags:":
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.parametrize("dtype", [np.float32, np.uint8, np.int8, ml_dtypes.bfloat16])
def test_copies_are_the_same_bytes_read_only_and_aligned(dtype):
    arena = hugepages.Arena()
    rng = np.random.default_rng(0)
    sources = [rng.standard_normal(shape).astype(dtype) for shape in [(7, 13), (3, 5), (100, 33)]]
    copies = [arena.copy(a) for a in sources]
    for a, c in zip(sources, copies, strict=True):
        assert c.dtype == a.dtype and c.shape == a.shape and c.flags.c_contiguous and not c.flags.writeable
        np.testing.assert_array_equal(c.view(np.uint8), a.view(np.uint8))
        assert c.ctypes.data % hugepages.ALIGN == 0 and not np.shares_memory(c, a)
    assert len({c.ctypes.data for c in copies}) == len(copies)
    transposed = sources[2].T  # any layout in, C order out
    copied = arena.copy(transposed)
    np.testing.assert_array_equal(copied.view(np.uint8), np.ascontiguousarray(transposed).view(np.uint8))


def test_chunks_start_on_a_huge_page_and_later_arrays_fill_earlier_tails():
    arena = hugepages.Arena()
    first = arena.copy(np.ones(10, np.float32))
    big = arena.copy(np.ones(hugepages.CHUNK // 4, np.float32))  # a whole chunk: a second one
    small = arena.copy(np.ones(10, np.float32))  # fits in the first chunk's tail
    assert first.ctypes.data % hugepages.HUGE_PAGE == 0 and big.ctypes.data % hugepages.HUGE_PAGE == 0
    assert small.ctypes.data == first.ctypes.data + hugepages.ALIGN
    huge = arena.copy(np.zeros(hugepages.CHUNK // 4 + 5, np.float32))  # larger than a chunk: its own, rounded up
    assert huge.ctypes.data % hugepages.HUGE_PAGE == 0 and not huge.any()


def test_a_chunk_is_let_go_with_its_last_array():
    """The arena refers to its chunks weakly: while an array lives its chunk does (and takes later arrays in its
    tail); once every array in it is gone, its mapping is unmapped, so a replaced model's weights give memory back."""
    arena = hugepages.Arena()
    first = arena.copy(np.ones(10, np.float32))
    mapping = arena._chunks[0].mapping
    assert mapping() is not None
    second = arena.copy(np.ones(10, np.float32))
    assert second.ctypes.data == first.ctypes.data + hugepages.ALIGN and len(arena._chunks) == 1
    del first
    gc.collect()
    assert mapping() is not None  # `second` still holds it
    del second
    gc.collect()
    assert mapping() is None
    third = arena.copy(np.ones(10, np.float32))  # a new chunk
    assert len(arena._chunks) == 1 and arena._chunks[0].mapping() is not None and third[0] == 1


@pytest.mark.skipif(not (sys.platform.startswith("linux") and hugepages.available()),
                    reason="transparent huge pages: Linux with THP set to 'always' or 'madvise'")
def test_the_arena_is_advised_huge_pages():
    copy = hugepages.Arena().copy(np.ones((4, 1024), np.float32))
    assert "hg" in _vm_flags(copy.ctypes.data)  # MADV_HUGEPAGE on the mapping


def test_the_numba_backend_takes_matrices_into_huge_pages(monkeypatch, tmp_path):
    pytest.importorskip("numba")
    from refllama.backends.numba_backend import NumbaBackend

    path = tmp_path / "tensors"
    path.write_bytes(np.arange(64 * 64 + 64, dtype=np.float32).tobytes())
    with open(path, "rb") as f:
        region = map_file(f)  # a model file's map
    mapped = np.frombuffer(region, np.float32, count=64 * 64).reshape(64, 64)  # 16 KiB: a matrix, read-only
    vector = np.frombuffer(region, np.float32, count=64, offset=64 * 64 * 4)
    tiny, in_memory = mapped[:2, :8], np.ones((64, 64), np.float32)  # small; reordered or converted at load
    monkeypatch.setenv("REFLLAMA_HUGE_PAGES", "1")
    backend = NumbaBackend()
    if not hugepages.available():
        assert backend.take_weight(mapped) is mapped
        return
    taken = backend.take_weight(mapped)
    assert not np.shares_memory(taken, mapped) and not taken.flags.writeable
    assert "hg" in _vm_flags(taken.ctypes.data)
    np.testing.assert_array_equal(taken, mapped)
    for kept in (vector, tiny, in_memory):
        assert backend.take_weight(kept) is kept
    monkeypatch.setenv("REFLLAMA_HUGE_PAGES", "0")
    assert NumbaBackend().take_weight(mapped) is mapped


def test_an_untied_embedding_table_is_looked_up_not_taken_as_a_streamed_weight():
    """take_weights hands the backend what a decode step streams through `take_weight` (the numba backend copies it
    into huge pages); an untied embedding table is only looked up, a row per token, so it goes through `asarray`.
    A tied one is also the output projection, so it is taken as a weight."""
    class Recording(NumpyBackend):
        def __init__(self) -> None:
            super().__init__()
            self.taken: list[int] = []

        def take_weight(self, a: np.ndarray) -> np.ndarray:
            self.taken.append(id(a))
            return super().take_weight(a)

    table, head, norm = np.ones((8, 4), np.float32), np.ones((8, 4), np.float32), np.ones(4, np.float32)
    for lm_head, expected in ((head, {id(head), id(norm)}), (None, {id(table), id(norm)})):
        backend = Recording()
        taken = take_weights(WeightMap(table, [], norm, lm_head), backend)
        assert set(backend.taken) == expected and taken.embeddings is table


def test_arena_arrays_are_not_file_pages_to_let_go():
    """An arena is anonymous memory: letting its pages go (MADV_DONTNEED, as take_weights does for a converted file
    tensor) would zero the arrays in it. Taking an engine's weights again (onto a second numba backend) keeps them
    as they are and leaves them intact."""
    arena = hugepages.Arena()
    weight = arena.copy(np.full((64, 64), 3.0, np.float32))
    release_pages(weight)
    assert (weight == 3.0).all()
    pytest.importorskip("numba")
    from refllama.backends.numba_backend import NumbaBackend

    norm = np.ones(64, np.float32)
    taken = take_weights(WeightMap(weight, [], norm, None), NumbaBackend())
    assert taken.embeddings is weight and (weight == 3.0).all()


@pytest.mark.skipif(not (sys.platform.startswith("linux") and hugepages.available()),
                    reason="transparent huge pages: Linux with THP set to 'always' or 'madvise'")
def test_a_gguf_loader_makes_its_reordered_q_k_rows_in_huge_pages(tmp_path):
    """The q/k rows a GGUF load puts back in HF order (float32 here) are made in huge pages, read-only; the numba
    backend keeps them as they are, so the engine's kept source and the model share one copy."""
    pytest.importorskip("numba")
    import refllama

    from conftest import FIXTURES
    from test_gguf import hf_folder_to_gguf

    engine = refllama.load(hf_folder_to_gguf(FIXTURES / "bias", tmp_path / "bias.gguf"), backend="numba")
    for source, layer in zip(engine.source_weights.layers, engine.model.weights.layers, strict=True):
        for name in ("q_proj", "k_proj"):
            kept, used = getattr(source.self_attention, name).weight, getattr(layer.self_attention, name).weight
            assert used is kept and not used.flags.writeable and "hg" in _vm_flags(used.ctypes.data)
