"""lmtrain.storage: the safetensors reader and writer, the staged publisher and the atomic writer, on their own."""

import ast
import json
import pathlib

import ml_dtypes
import numpy as np
import pytest
from safetensors.torch import load_file

from lmtrain.paths import as_path
from lmtrain.storage.atomic import atomic_write_json
from lmtrain.storage.publish import Publisher
from lmtrain.storage.safetensors import SafetensorsError, SafetensorsReader, write_safetensors, write_tensors

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _tensors() -> dict[str, np.ndarray]:
    rs = np.random.RandomState(0)
    return {"b.weight": rs.normal(size=(3, 5)).astype(ml_dtypes.bfloat16), "a.bias": rs.normal(size=(7,)).astype(np.float32),
            "c.half": rs.normal(size=(2, 2, 2)).astype(np.float16)}


def test_written_tensors_read_back_exactly_here_and_in_the_safetensors_package(tmp_path):
    path = as_path(tmp_path / "t.safetensors")
    tensors = _tensors()
    write_tensors(path, tensors, {"format": "pt", "note": "kept"})
    reader = SafetensorsReader([path])
    assert reader.names() == set(tensors) and reader.metadata(path) == {"format": "pt", "note": "kept"}
    theirs = load_file(str(path))
    for name, value in tensors.items():
        ours = reader.read(name)
        assert ours.dtype == value.dtype and np.array_equal(ours, value)
        assert np.array_equal(theirs[name].float().numpy(), value.astype(np.float32))


def test_the_streaming_writer_refuses_a_tensor_that_is_not_the_planned_one(tmp_path):
    entries = [("x", "F32", (2, 3))]
    with pytest.raises(AssertionError, match="planned F32"):
        write_safetensors(as_path(tmp_path / "t.safetensors"), entries, [np.zeros((3, 2), np.float32)], {})
    with pytest.raises(AssertionError, match="planned F32"):
        write_safetensors(as_path(tmp_path / "t.safetensors"), entries, [np.zeros((2, 3), np.float16)], {})


class _ToolError(ValueError):
    pass


def test_a_truncated_file_is_named_with_the_callers_error_class(tmp_path):
    path = tmp_path / "t.safetensors"
    write_tensors(as_path(path), _tensors(), {})
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(SafetensorsError, match=f"{path} is truncated"):
        SafetensorsReader([path])
    with pytest.raises(_ToolError, match="Re-download or re-save"):
        SafetensorsReader([path], error=_ToolError)


def test_publisher_replaces_the_old_directory_only_with_a_whole_new_one(tmp_path, capsys):
    publisher = Publisher(markers=("done",), name="thing", tool="tool")
    out = as_path(tmp_path / "out")

    def write(value: str, fail: bool = False) -> None:
        with publisher.staged(out, publisher.staging_dir(out)) as staging:
            (staging / "data").write_text(value)
            if fail:
                raise OSError("disk full")
            (staging / "done").write_text("")

    write("one")
    with pytest.raises(OSError, match="disk full"):
        write("two", fail=True)
    assert (out / "data").read_text() == "one", "a failed write leaves the old directory as it was"
    write("three")
    assert sorted(p.name for p in out.iterdir()) == ["data", "done"] and (out / "data").read_text() == "three"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no staging or moved-aside sibling is left"


def test_atomic_json_is_old_or_new_and_leaves_no_temporary_behind(tmp_path):
    path = tmp_path / "m.json"
    atomic_write_json(path, {"v": 1}, tmp_tag="run1")
    with pytest.raises(TypeError):
        atomic_write_json(path, {"v": object()}, tmp_tag="run1")
    assert json.loads(path.read_text()) == {"v": 1} and sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]
    atomic_write_json(path, {"v": 2})
    assert path.read_text() == '{\n "v": 2\n}\n'


def test_storage_imports_nothing_of_lmtrain_but_paths():
    """The core may use storage, so storage may not pull in tools (interop, evaluate, ...) or other core parts."""
    offending = []
    for path in sorted((ROOT / "lmtrain" / "storage").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            module = node.module if isinstance(node, ast.ImportFrom) else None
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [module or ""]
            for name in names:
                if name.startswith("lmtrain") and not name.startswith(("lmtrain.paths", "lmtrain.storage")):
                    offending.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {name}")
    assert offending == []
