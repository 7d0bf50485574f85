from __future__ import annotations

import json
import shutil
import struct

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from refllama.errors import CheckpointError
from refllama.formats.safetensors import SafetensorsFile, TensorSource, read_header

from conftest import FIXTURES

DTYPES = [np.float64, np.float32, np.float16, ml_dtypes.bfloat16, np.int64, np.int32, np.int16, np.int8,
          np.uint8, np.bool_]


def test_reader_agrees_with_the_safetensors_package(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {f"t{i}": (rng.standard_normal((3, 5 + i)) * 50).astype(dt) for i, dt in enumerate(DTYPES)}
    tensors["empty"] = np.zeros((0, 4), np.float32)
    tensors["scalar"] = np.array(3.5, np.float32)
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    f = SafetensorsFile(path)
    assert f.metadata == {"format": "pt"}
    for name, expected in tensors.items():
        got = f.get(name)
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert got.tobytes() == expected.tobytes()


def test_views_are_zero_copy_and_read_only(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": np.arange(12, dtype=np.float32).reshape(3, 4)}, str(path))
    w = SafetensorsFile(path).get("w")
    assert not w.flags.writeable
    assert not w.flags.owndata  # a view of the memory map, not a copy
    with pytest.raises(ValueError):
        w[0, 0] = 1


def _write_raw(path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("header,data,message", [
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "outside the data region"),
    ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "needs 12"),
    ({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unsupported dtype"),
    ({"w": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unsupported dtype"),
    ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "invalid shape"),
    ({"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, "needs dtype, shape and data_offsets"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "overlaps"),
])
def test_malformed_headers_name_file_and_tensor(tmp_path, header, data, message):
    path = tmp_path / "bad.safetensors"
    _write_raw(path, header, data)
    with pytest.raises(CheckpointError, match=message) as info:
        read_header(path)
    assert info.value.path == str(path)


def test_truncated_and_garbage_files(tmp_path):
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="too short"):
        read_header(short)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(CheckpointError, match="does not fit"):
        read_header(huge)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{]")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_header(garbage)
    with pytest.raises(CheckpointError, match="not found"):
        read_header(tmp_path / "absent.safetensors")


def test_sharded_index(tmp_path):
    folder = tmp_path / "sharded"
    shutil.copytree(FIXTURES / "sharded", folder)
    source = TensorSource(folder)
    assert len(source.files) == 2
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert source.names() == sorted(index["weight_map"])

    broken = dict(index)
    broken["weight_map"] = {**index["weight_map"], "model.extra.weight": "model-00009-of-00009.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps(broken))
    with pytest.raises(CheckpointError, match="missing") as info:
        TensorSource(folder)
    assert info.value.tensor == "model.extra.weight"

    moved = dict(index)
    first = next(iter(index["weight_map"]))
    other = ({*index["weight_map"].values()} - {index["weight_map"][first]}).pop()
    moved["weight_map"] = {**index["weight_map"], first: other}
    (folder / "model.safetensors.index.json").write_text(json.dumps(moved))
    with pytest.raises(CheckpointError, match="shard lacks it"):
        TensorSource(folder)


def test_folder_without_weights(tmp_path):
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        TensorSource(tmp_path)
