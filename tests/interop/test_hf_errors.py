"""Every user mistake in `lmtrain import` / `lmtrain export` is exit code 2 with one line that names the file
(or field, or flag) and the fix; never a traceback, never garbage weights."""

import json
import os
import shutil
import struct

import pytest
from etils import epath

from lmtrain.interop import hf_export, hf_import
from tests.interop.test_hf_import import random_hf_model


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    for name in ("llama", "gpt2"):
        random_hf_model(name, root / name, tokenizer=name == "llama")
    return root


@pytest.fixture
def llama(hf_models, tmp_path):
    shutil.copytree(hf_models / "llama", tmp_path / "llama")
    return tmp_path / "llama"


def _import_error(capsys, *args) -> str:
    capsys.readouterr()  # what building the test model printed
    code = hf_import.main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def _export_error(capsys, *args) -> str:
    capsys.readouterr()
    code = hf_export.main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def _edit_config(directory, edit) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


# ---------------------------------------------------------------------------------------------- safetensors


def test_truncated_safetensors_is_named(llama, tmp_path, capsys):
    weights = llama / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])  # a download cut short: the header is whole, the data is not
    err = _import_error(capsys, llama, tmp_path / "work")
    assert f"{weights} is truncated" in err and "Re-download" in err
    assert not (tmp_path / "work" / "config.json").exists()


def test_safetensors_with_a_cut_header_is_named(llama, tmp_path, capsys):
    weights = llama / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    err = _import_error(capsys, llama, tmp_path / "work")
    assert str(weights) in err and "truncated or not a safetensors file" in err


def test_malformed_header_entry_and_unreadable_dtype_are_named(llama, tmp_path, capsys):
    weights = llama / "model.safetensors"
    data = weights.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])

    def rewrite(h):  # a new header in front of the same data, offsets unchanged
        raw = json.dumps(h, separators=(",", ":")).encode()
        weights.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])

    header["model.norm.weight"]["dtype"] = "F8_E4M3"  # a dtype lmtrain cannot read
    rewrite(header)
    err = _import_error(capsys, llama, tmp_path / "work")
    assert "'model.norm.weight' has dtype F8_E4M3" in err and str(weights) in err
    header["model.norm.weight"]["dtype"] = "F32"
    header["model.norm.weight"]["data_offsets"] = "here"
    rewrite(header)
    err = _import_error(capsys, llama, tmp_path / "work")
    assert "header entry of tensor 'model.norm.weight' is malformed" in err


def _rewrite_header(weights, edit) -> None:
    """A new header (edited by `edit`) in front of the same data bytes."""
    data = weights.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header, separators=(",", ":")).encode()
    weights.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def _overlap(header):  # the final norm reads layer 0's attention norm bytes (same size)
    header["model.norm.weight"]["data_offsets"] = header["model.layers.0.input_layernorm.weight"]["data_offsets"]


def _wrong_size(header):
    header["model.norm.weight"]["shape"] = [header["model.norm.weight"]["shape"][0] // 2]


@pytest.mark.parametrize("edit, expected", [
    (_overlap, "data_offsets of tensor 'model.norm.weight' ("),
    (_wrong_size, "tensor 'model.norm.weight' (F32 ["),
    (None, "bytes after the last tensor are not part of any tensor"),
])
def test_safetensors_offsets_must_tile_the_data(llama, tmp_path, capsys, edit, expected):
    weights = llama / "model.safetensors"
    if edit is None:
        weights.write_bytes(weights.read_bytes() + bytes(64))  # a polyglot tail the header does not cover
    else:
        _rewrite_header(weights, edit)
    err = _import_error(capsys, llama, tmp_path / "work")
    assert str(weights) in err and expected in err, err
    if edit is _overlap:
        assert "overlaps tensor 'model.layers.0.input_layernorm.weight'" in err, err
    assert not (tmp_path / "work" / "config.json").exists()


def test_a_refused_pickle_only_import_leaves_nothing(llama, tmp_path, capsys):
    (llama / "model.safetensors").unlink()
    (llama / "pytorch_model.bin").write_bytes(b"\x80\x05 never unpickled")
    assert (llama / "tokenizer.json").is_file()  # what the import used to copy before it looked at the weights
    assert "never unpickles" in _import_error(capsys, llama, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    (tmp_path / "existing").mkdir()
    assert "never unpickles" in _import_error(capsys, llama, tmp_path / "existing")
    assert list((tmp_path / "existing").iterdir()) == []


def test_an_import_failing_while_writing_removes_the_workdir_it_created(llama, tmp_path, capsys, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "new" / "init_params"))

    monkeypatch.setattr(hf_import, "save_init_params", full_disk)
    err = _import_error(capsys, llama, tmp_path / "new")
    assert "No space left on device" in err
    assert not (tmp_path / "new").exists()


def test_broken_index_is_named(tmp_path, capsys):
    random_hf_model("llama", tmp_path / "hf", max_shard_size="40KB")
    index = tmp_path / "hf" / "model.safetensors.index.json"
    shard = sorted((tmp_path / "hf").glob("model-*.safetensors"))[0]
    shard.unlink()
    assert f"lists {shard.name}, which is missing" in _import_error(capsys, tmp_path / "hf", tmp_path / "work")
    index.write_text('{"weight_map": ')
    err = _import_error(capsys, tmp_path / "hf", tmp_path / "work")
    assert str(index) in err and "not valid JSON" in err


@pytest.mark.parametrize("entry", ["../outside.safetensors", "sub/../../outside.safetensors", "/etc/passwd"])
def test_index_naming_a_file_outside_the_directory_is_refused(tmp_path, capsys, entry):
    random_hf_model("llama", tmp_path / "hf", max_shard_size="40KB")
    index = tmp_path / "hf" / "model.safetensors.index.json"
    shard = sorted((tmp_path / "hf").glob("model-*.safetensors"))[0]
    shutil.copy(shard, tmp_path / "outside.safetensors")  # a readable file there: only the check can refuse it
    content = json.loads(index.read_text())
    tensor = next(t for t, f in content["weight_map"].items() if f == shard.name)
    content["weight_map"][tensor] = entry
    index.write_text(json.dumps(content))
    err = _import_error(capsys, tmp_path / "hf", tmp_path / "work")
    assert f"{index}: weight_map entry '{tensor}' is '{entry}', which is not a file inside" in err, err
    assert not (tmp_path / "work" / "config.json").exists()


# ---------------------------------------------------------------------------------------------- config.json


@pytest.mark.parametrize("family, field", [("llama", "hidden_size"), ("llama", "num_hidden_layers"),
                                           ("gpt2", "n_embd"), ("gpt2", "vocab_size")])
def test_missing_config_field_is_named_with_the_file(hf_models, tmp_path, capsys, family, field):
    hf_dir = tmp_path / family
    shutil.copytree(hf_models / family, hf_dir)
    _edit_config(hf_dir, lambda c: c.pop(field))
    err = _import_error(capsys, hf_dir, tmp_path / "work")
    assert f"{hf_dir / 'config.json'}: field '{field}' is missing" in err


def test_wrongly_typed_config_fields_are_named(llama, tmp_path, capsys):
    for field, value, want in [("num_hidden_layers", "2", "a positive integer"), ("vocab_size", 0, "a positive integer"),
                               ("rms_norm_eps", "tiny", "a non-negative number"),
                               ("tie_word_embeddings", "no", "true or false")]:
        original = json.loads((llama / "config.json").read_text())
        _edit_config(llama, lambda c, f=field, v=value: c.update({f: v}))
        err = _import_error(capsys, llama, tmp_path / "work")
        assert f"field '{field}' is {value!r}; it must be {want}" in err, err
        (llama / "config.json").write_text(json.dumps(original))


def test_incomplete_rope_scaling_is_named(llama, tmp_path, capsys):
    _edit_config(llama, lambda c: c["rope_parameters"].pop("low_freq_factor"))
    err = _import_error(capsys, llama, tmp_path / "work")
    assert "field 'low_freq_factor' is missing" in err and "rope_parameters" in err


@pytest.mark.parametrize("content, expected", [("[1, 2]", "holds a JSON list"), ("{", "not valid JSON"),
                                               ('{"architectures": "LlamaForCausalLM"}', "' is missing"),
                                               ('{"architectures": [7]}', "must be a list of class names")])
def test_unreadable_config_json_is_named(llama, tmp_path, capsys, content, expected):
    (llama / "config.json").write_text(content)
    err = _import_error(capsys, llama, tmp_path / "work")
    assert str(llama / "config.json") in err and expected in err


# ---------------------------------------------------------------------------------------------- import paths, flags


def test_import_path_mistakes(llama, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no config.json" in _import_error(capsys, empty, tmp_path / "w1")
    assert "does not exist" in _import_error(capsys, tmp_path / "nowhere", tmp_path / "w2")
    assert "is a file" in _import_error(capsys, llama / "config.json", tmp_path / "w3")
    file_workdir = tmp_path / "file"
    file_workdir.write_text("keep me")
    assert "WORKDIR" in _import_error(capsys, llama, file_workdir) and file_workdir.read_text() == "keep me"
    assert "is the Hugging Face directory itself" in _import_error(capsys, llama, llama, "--force")
    trained = tmp_path / "trained"
    (trained / "checkpoints" / "100").mkdir(parents=True)
    assert "holds checkpoints/" in _import_error(capsys, llama, trained, "--force")


def test_mesh_flags_that_do_not_fit_are_named(llama, tmp_path, capsys):
    err = _import_error(capsys, llama, tmp_path / "work", "--fsdp", "3")
    assert "--fsdp=3" in err
    for flags in (["--fsdp", "0"], ["--tensor", "-1"], ["--param-dtype", "float8"]):
        with pytest.raises(SystemExit) as info:  # argparse: usage and the bad flag, exit 2
            hf_import.main([str(llama), str(tmp_path / "work"), *flags])
        assert info.value.code == 2
        assert flags[0] in capsys.readouterr().err


def test_read_only_workdir_is_named_before_anything_is_loaded(llama, tmp_path, capsys, monkeypatch):
    # Tests run as root, where a chmod does not stop writes; an OS refusal is simulated instead.
    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", os.fspath(self))

    monkeypatch.setattr(type(epath.Path(tmp_path)), "write_text", refuse)
    err = _import_error(capsys, llama, tmp_path / "work")
    assert f"cannot write to WORKDIR {tmp_path / 'work'} (Permission denied)" in err


# ---------------------------------------------------------------------------------------------- export


def test_export_path_mistakes(tmp_path, capsys):
    assert "no config.json" in _export_error(capsys, tmp_path / "nothing", tmp_path / "out")
    workdir_file = tmp_path / "workfile"
    workdir_file.write_text("x")
    assert "is a file, not an lmtrain WORKDIR" in _export_error(capsys, workdir_file, tmp_path / "out")
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "config.json").write_text("{}")
    out_file = tmp_path / "out_file"
    out_file.write_text("x")
    assert "is a file" in _export_error(capsys, workdir, out_file)
    for size in ("0", "lots"):
        assert "--max-shard-size" in _export_error(capsys, workdir, tmp_path / "out", "--max-shard-size", size)
    with pytest.raises(SystemExit) as info:
        hf_export.main([str(workdir), str(tmp_path / "out"), "--dtype", "int8"])
    assert info.value.code == 2


def test_unwritable_export_parent_is_named(tmp_path, monkeypatch):
    from lmtrain.interop.families import HFInteropError
    from lmtrain.interop.hf_export import export_params
    from tests.interop.test_hf_export_target import _cfg, _params

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", os.fspath(self))

    monkeypatch.setattr(type(epath.Path(tmp_path)), "mkdir", refuse)
    cfg = _cfg()
    with pytest.raises(HFInteropError, match="cannot create .* export into a directory whose parent you can write"):
        export_params(cfg, _params(cfg, 0), tmp_path / "out")
