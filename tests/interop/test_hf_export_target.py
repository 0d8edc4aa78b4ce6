"""`lmtrain export` never destroys what the user had, and a killed export never leaves a directory that looks whole."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from lmtrain.interop import hf_export
from lmtrain.interop.export_common import recover_interrupted_export
from lmtrain.interop.families import HFInteropError
from lmtrain.interop.hf_export import export_params
from lmtrain.model import ModelConfig, ModelDef
from lmtrain.paths import as_path
from lmtrain.storage import publish
from tests.helpers import small_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB = 99


def _cfg() -> ModelConfig:
    return ModelConfig.from_config(small_config("llama", **{"model.vocab_size": VOCAB}).model)


def _params(cfg: ModelConfig, seed: int) -> dict:
    rs = np.random.RandomState(seed)
    return jax.tree.map(lambda s: np.asarray(rs.normal(0, 0.1, s.shape), s.dtype), ModelDef(cfg).shapes)


def _snapshot(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _leftovers(out) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


def test_non_empty_directory_is_refused_and_kept(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "model.safetensors").write_bytes(b"the user's weights")
    before = _snapshot(out)
    cfg = _cfg()
    with pytest.raises(HFInteropError, match="not empty .*--force"):
        export_params(cfg, _params(cfg, 0), out)
    assert _snapshot(out) == before and _leftovers(out) == []

    workdir = tmp_path / "work"  # the CLI refuses before it looks for a checkpoint
    workdir.mkdir()
    (workdir / "config.json").write_text("{}")
    assert hf_export.main([str(workdir), str(out)]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--force" in err and "Traceback" not in err
    assert _snapshot(out) == before


def test_force_replaces_an_earlier_export_and_nothing_else(tmp_path):
    cfg, out = _cfg(), tmp_path / "out"
    out.mkdir()  # an empty directory is fine without --force
    export_params(cfg, _params(cfg, 0), out)
    first = _snapshot(out)
    export_params(cfg, _params(cfg, 1), out, force=True)
    second = _snapshot(out)
    assert set(first) == set(second) and first["model.safetensors"] != second["model.safetensors"]
    assert _leftovers(out) == [], "no staging or old directory is left behind"

    (out / "sub").mkdir()
    with pytest.raises(HFInteropError, match="holds directories"):
        export_params(cfg, _params(cfg, 2), out, force=True)
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    with pytest.raises(HFInteropError, match="does not look like an earlier model export"):
        export_params(cfg, _params(cfg, 2), user, force=True)
    assert (user / "thesis.tex").read_text() == "years of work"
    file_target = tmp_path / "file"
    file_target.write_text("x")
    with pytest.raises(HFInteropError, match="is a file"):
        export_params(cfg, _params(cfg, 2), file_target, force=True)


def test_export_into_the_workdir_is_refused(tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "config.json").write_text("{}")
    for target in (workdir, tmp_path):
        with pytest.raises(HFInteropError, match="holds the WORKDIR"):
            hf_export.export_workdir(workdir, target, force=True)
    assert (workdir / "config.json").read_text() == "{}"


def test_force_interrupted_between_the_renames_is_undone(tmp_path):
    """A kill after the old export was moved aside and before the new one was renamed in: the next export
    (of any kind) moves the old one back, and a leftover staging directory is removed."""
    cfg, out = _cfg(), tmp_path / "out"
    export_params(cfg, _params(cfg, 0), out)
    old = _snapshot(out)
    os.rename(out, tmp_path / ".out.export-old-123-abc")
    (tmp_path / ".out.export-tmp-123-abc").mkdir()
    (tmp_path / ".out.export-tmp-123-abc" / "model.safetensors").write_bytes(b"half")
    with pytest.raises(HFInteropError, match="not empty"):
        export_params(cfg, _params(cfg, 1), out)
    assert _snapshot(out) == old and _leftovers(out) == []


def test_object_store_publish_keeps_the_old_export_until_the_new_one_is_whole(tmp_path, monkeypatch):
    """gs:// has no directory rename: files are copied with config.json last, the old export kept aside.
    A failure half-way through the copy leaves OUT without config.json and the next export restores the old."""
    cfg, out = _cfg(), tmp_path / "out"
    export_params(cfg, _params(cfg, 0), out, max_shard_bytes=20_000)
    old = _snapshot(out)
    monkeypatch.setattr(publish, "is_remote", lambda path: True)

    copied = []
    real_copy = publish.copy_tree

    def copy_then_fail(source, target, last=()):
        if target == as_path(out):  # the new export being published: stop after two files
            for f in sorted(source.iterdir(), key=lambda p: p.name == "config.json")[:2]:
                f.copy(target / f.name, overwrite=True)
                copied.append(f.name)
            raise OSError("connection reset")
        real_copy(source, target, last=last)

    monkeypatch.setattr(publish, "copy_tree", copy_then_fail)
    with pytest.raises(OSError):
        export_params(cfg, _params(cfg, 1), out, max_shard_bytes=20_000, force=True)
    assert "config.json" not in copied and not (out / "config.json").exists(), "a half copy never looks complete"
    monkeypatch.setattr(publish, "copy_tree", real_copy)
    notes = recover_interrupted_export(as_path(out))
    assert any("restored the previous export" in n for n in notes)
    assert _snapshot(out) == old and _leftovers(out) == []

    export_params(cfg, _params(cfg, 1), out, max_shard_bytes=20_000, force=True)
    assert _snapshot(out)["config.json"] == old["config.json"] and _snapshot(out) != old
    assert _leftovers(out) == []


_SLOW_EXPORT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    import jax, numpy as np
    from lmtrain.interop import hf_export
    from lmtrain.storage import safetensors
    from lmtrain.model import ModelConfig, ModelDef
    from tests.helpers import small_config

    cfg = ModelConfig.from_config(small_config("llama", **{{"model.vocab_size": {vocab}}}).model)
    rs = np.random.RandomState(int(sys.argv[2]))
    params = jax.tree.map(lambda s: np.asarray(rs.normal(0, 0.1, s.shape), s.dtype), ModelDef(cfg).shapes)
    write = safetensors._write_tensor

    def slow_write(f, tensor):  # the test kills this process while it is writing tensors
        write(f, tensor)
        print("tensor", flush=True)
        time.sleep(0.3)

    safetensors._write_tensor = slow_write
    hf_export.export_params(cfg, params, sys.argv[1], max_shard_bytes=20_000, force=True)
    print("done", flush=True)
""")


@pytest.mark.slow
@pytest.mark.parametrize("existing", [True, False], ids=["replacing", "fresh"])
def test_sigkill_mid_export_leaves_the_old_export_or_nothing(tmp_path, existing):
    cfg, out = _cfg(), tmp_path / "out"
    if existing:
        export_params(cfg, _params(cfg, 0), out, max_shard_bytes=20_000)
    before = _snapshot(out) if existing else None
    script = tmp_path.parent / f"{tmp_path.name}_slow_export.py"
    script.write_text(_SLOW_EXPORT.format(root=ROOT, vocab=VOCAB))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.Popen([sys.executable, str(script), str(out), "1"], stdout=subprocess.PIPE, text=True, env=env)
    written = 0
    for line in proc.stdout:
        written += line.strip() == "tensor"
        if written == 8:  # several files in: the first safetensors shards are whole, one is half written
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert written == 8, "the export finished before it could be killed"

    if existing:
        assert _snapshot(out) == before, "the old export is intact"
    else:
        assert not out.exists()
    staging = [p for p in tmp_path.iterdir() if p.name.startswith(".out.export-tmp-")]
    assert len(staging) == 1 and not (staging[0] / "config.json").exists(), "the half export is hidden, unfinished"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == (["out"] if existing else [])

    export_params(cfg, _params(cfg, 1), out, max_shard_bytes=20_000, force=True)
    assert _leftovers(out) == [], "the next export removes what the killed one left"
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == VOCAB and (out / "model.safetensors.index.json").is_file()


def test_gs_export_through_the_fake_gcs(fake_gcs, tmp_path):
    """On gs:// the export is staged under a temporary prefix and copied in with config.json last; the objects
    equal a local export's files, a non-empty prefix is refused, --force replaces it, nothing is left over."""
    cfg = _cfg()
    local = tmp_path / "local"
    export_params(cfg, _params(cfg, 0), local, max_shard_bytes=20_000)
    remote = as_path(f"{fake_gcs.url}/models/out")
    export_params(cfg, _params(cfg, 0), str(remote), max_shard_bytes=20_000)
    on_server = fake_gcs.objects_dir / "models" / "out"
    assert _snapshot(on_server) == _snapshot(local)

    with pytest.raises(HFInteropError, match="not empty"):
        export_params(cfg, _params(cfg, 1), str(remote), max_shard_bytes=20_000)
    export_params(cfg, _params(cfg, 1), str(remote), max_shard_bytes=20_000, force=True)
    export_params(cfg, _params(cfg, 1), local, max_shard_bytes=20_000, force=True)
    assert _snapshot(on_server) == _snapshot(local)
    assert sorted(n.split("/")[1] for n in fake_gcs.object_names() if n.startswith("models/")) == sorted(
        ["out"] * len(_snapshot(local))), "no staging or old prefix is left in the bucket"


def test_a_symlinked_out_is_refused_and_an_old_link_left_aside_is_unlinked(tmp_path, capsys):
    """Issue 19 item 7: --force onto a linked OUT published the export in the link's place, then failed (exit 2)
    removing the moved-aside link, and that link made every later export fail. Now a linked OUT is refused before
    anything is written; a link (or stray file) left among OUT's own siblings is removed as a link, never
    followed."""
    cfg = _cfg()
    real, out = tmp_path / "real", tmp_path / "out"
    export_params(cfg, _params(cfg, 0), real)
    before = _snapshot(real)
    out.symlink_to(real)
    with pytest.raises(HFInteropError, match=r"is a symbolic link \(to .*real\); export into .*real itself"):
        export_params(cfg, _params(cfg, 1), out, force=True)
    assert out.is_symlink() and _snapshot(real) == before and _leftovers(real) == ["out"]

    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "config.json").write_text("{}")
    assert hf_export.main([str(workdir), str(out), "--force"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is a symbolic link" in err

    # what the old bug left: OUT a real export, a moved-aside link to the user's directory, a stray file
    out.unlink()
    export_params(cfg, _params(cfg, 1), out)
    (tmp_path / ".out.export-old-1-abc").symlink_to(real)
    (tmp_path / ".out.export-tmp-1-abc").write_text("stray")
    export_params(cfg, _params(cfg, 2), out, force=True)
    assert _snapshot(real) == before, "the link's target is untouched"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "real", "work"]


def test_a_failed_clean_up_after_publishing_is_a_note_not_a_failure(tmp_path, monkeypatch, capsys):
    cfg, out = _cfg(), tmp_path / "out"
    export_params(cfg, _params(cfg, 0), out)

    def fail(path):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(publish, "_remove_sibling", fail)
    export_params(cfg, _params(cfg, 1), out, force=True)  # no exception: the new export is published
    err = capsys.readouterr().err
    assert "the new export is in" in err and "could not be removed" in err
    monkeypatch.undo()
    reloaded = _snapshot(out)
    export_params(cfg, _params(cfg, 2), out, force=True)  # the next export removes what was left
    assert _leftovers(out) == [] and _snapshot(out)["model.safetensors"] != reloaded["model.safetensors"]


def test_recovery_never_deletes_files_a_user_put_in_out(tmp_path):
    """An export moved aside by an interrupted --force is put back only where OUT is missing or empty: files the user
    has since put in OUT are not an export's, and stay (the old export stays aside, named in a note)."""
    cfg, out = _cfg(), tmp_path / "out"
    export_params(cfg, _params(cfg, 0), out)
    old = _snapshot(out)
    aside = tmp_path / ".out.export-old-123-abc"
    os.rename(out, aside)
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    notes = recover_interrupted_export(as_path(out))
    assert (out / "notes.txt").read_text() == "mine" and _snapshot(aside) == old
    assert len(notes) == 1 and "was not put back" in notes[0]
    (out / "notes.txt").unlink()
    recover_interrupted_export(as_path(out))  # OUT empty again: the old export goes back
    assert _snapshot(out) == old and _leftovers(out) == []
