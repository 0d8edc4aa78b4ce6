"""gs:// through a local fake GCS server (tests/gcs_fake.py): etils.epath, tensorstore, Orbax and lmtrain.paths.

Every test checks the objects on the server's side (`fake_gcs.objects_dir`, `object_names()`), and that
nothing went to a local `gs:` directory, which is what `Path("gs://b/x").resolve()` would write to.
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from lmtrain.paths import append_text, as_path, copy_tree, files_under, is_remote, local_dir
from lmtrain.storage.atomic import atomic_write_text

REPO = pathlib.Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("no_local_gs_dir")


@pytest.fixture
def no_local_gs_dir(tmp_path, monkeypatch):
    """Run in an empty cwd and fail if a local `gs:` directory appears in it."""
    monkeypatch.chdir(tmp_path)
    yield
    assert not (tmp_path / "gs:").exists(), f"gs:// was written to the local directory {tmp_path / 'gs:'}"


def test_epath_write_read_list_glob_rename_delete(fake_gcs):
    root = as_path(f"{fake_gcs.url}/run")
    assert is_remote(root) and str(root) == "gs://test-bucket/run"
    assert not root.exists()

    (root / "config.json").write_text('{"a": 1}')
    big = np.random.default_rng(0).bytes(12 << 20)  # > gcsfs's 5 MiB block: a multi-chunk resumable upload
    (root / "shards" / "train-00000.bin").write_bytes(big)
    (root / "shards" / "train-00001.bin").write_bytes(b"small")

    assert (fake_gcs.objects_dir / "run" / "config.json").read_text() == '{"a": 1}'
    assert (fake_gcs.objects_dir / "run" / "shards" / "train-00000.bin").read_bytes() == big
    assert root.is_dir() and (root / "shards").is_dir() and (root / "config.json").is_file()
    assert sorted(p.name for p in root.iterdir()) == ["config.json", "shards"]
    assert sorted(str(p) for p in root.glob("shards/*.bin")) == [
        "gs://test-bucket/run/shards/train-00000.bin", "gs://test-bucket/run/shards/train-00001.bin"]
    assert (root / "shards" / "train-00000.bin").read_bytes() == big
    with (root / "shards" / "train-00000.bin").open("rb") as f:  # a ranged read
        f.seek(7 << 20)
        assert f.read(1000) == big[7 << 20:(7 << 20) + 1000]

    # A directory on GCS is only a name prefix: mkdir makes nothing, so an empty one does not exist.
    (root / "empty").mkdir(parents=True, exist_ok=True)
    assert not (root / "empty").exists()

    # rename refuses an existing target; replace overwrites it. Both are per object (no directory rename).
    (root / "metrics.jsonl.tmp").write_text("new")
    (root / "metrics.jsonl").write_text("old")
    with pytest.raises(FileExistsError):
        (root / "metrics.jsonl.tmp").rename(root / "metrics.jsonl")
    (root / "metrics.jsonl.tmp").replace(root / "metrics.jsonl")
    assert (root / "metrics.jsonl").read_text() == "new" and not (root / "metrics.jsonl.tmp").exists()

    (root / "shards").rmtree()
    (root / "config.json").unlink()
    assert fake_gcs.object_names() == ["run/metrics.jsonl"]
    assert sorted(os.listdir(fake_gcs.objects_dir / "run")) == ["metrics.jsonl"]  # empty "directories" pruned
    with pytest.raises(FileNotFoundError):
        (root / "config.json").read_text()


def test_fake_honours_tensorstore_conditional_writes_and_ranges(fake_gcs):
    """What Orbax's OCDBT relies on: generation preconditions (compare-and-swap) and byte ranges."""
    import tensorstore as ts

    kv = ts.KvStore.open({"driver": "gcs", "bucket": "test-bucket", "path": "kv/"}).result()
    g1 = kv.write("k", b"0123456789").result().generation
    g2 = kv.write("k", b"abcdefghij", if_equal=g1).result().generation
    assert g2 and g2 != g1
    stale = kv.write("k", b"lost update", if_equal=g1).result()
    assert not stale.generation  # the swap failed: someone else wrote since g1
    assert kv.read("k").result().value == b"abcdefghij"
    # if_not_equal the current generation: not modified, nothing re-sent.
    assert kv.read("k", if_not_equal=g2).result().state == "unspecified"
    assert kv.read("k", byte_range=slice(2, 5)).result().value == b"cde"
    assert sorted(kv.list().result()) == [b"k"]
    kv.delete_range(ts.KvStore.KeyRange()).result()
    assert fake_gcs.object_names() == []
    requests = [f"{m} {p}" for m, p in fake_gcs.server.requests]
    assert any("ifGenerationMatch=" in r for r in requests) and any("ifGenerationNotMatch=" in r for r in requests)


def _tree(mesh):
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    w = jnp.arange(64 * 8, dtype=jnp.float32).reshape(64, 8)
    return {"params": {"w": jax.device_put(w, NamedSharding(mesh, P("data", "model"))),
                       "b": jax.device_put(jnp.linspace(0, 1, 8), NamedSharding(mesh, P("model")))},
            "step": jnp.asarray(3, jnp.int32)}


@pytest.mark.multidevice
def test_orbax_checkpoint_manager_saves_and_restores_a_sharded_tree(fake_gcs):
    import orbax.checkpoint as ocp

    assert jax.device_count() == 8
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    tree = _tree(mesh)
    directory = f"{fake_gcs.url}/ckpts"
    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
    with ocp.CheckpointManager(directory, options=options, item_names=("state", "meta")) as mgr:
        for step in (1, 2, 3):
            tree["step"] = jnp.asarray(step, jnp.int32)
            mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                                     meta=ocp.args.JsonSave({"step": step})))
        mgr.wait_until_finished()
        assert mgr.all_steps() == [2, 3]

    names = fake_gcs.object_names()
    # On gs:// Orbax writes straight into the step directory and marks it complete with a
    # commit_success.txt object (CommitFileTemporaryPath); it renames nothing.
    assert "ckpts/3/commit_success.txt" in names and "ckpts/3/state/commit_success.txt" in names
    assert not any(n.startswith("ckpts/1/") for n in names)  # max_to_keep deleted step 1 on the server
    assert not any("orbax-checkpoint-tmp" in n for n in names)
    assert any(n.startswith("ckpts/3/state/ocdbt.process_0/d/") for n in names)  # array data, via tensorstore
    assert (fake_gcs.objects_dir / "ckpts" / "3" / "state" / "manifest.ocdbt").is_file()

    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)
    with ocp.CheckpointManager(directory, item_names=("state", "meta")) as mgr:
        assert mgr.latest_step() == 3
        out = mgr.restore(3, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                      meta=ocp.args.JsonRestore()))
    restored = out["state"]
    assert out["meta"] == {"step": 3} and int(restored["step"]) == 3
    for key in ("w", "b"):
        np.testing.assert_array_equal(np.asarray(restored["params"][key]), np.asarray(tree["params"][key]))
        assert restored["params"][key].sharding == tree["params"][key].sharding


@pytest.mark.multidevice
def test_orbax_ignores_a_gcs_step_without_commit_success(fake_gcs):
    """A save killed half-way on gs:// leaves a step directory with no commit marker; it is never a step."""
    import orbax.checkpoint as ocp

    mesh = jax.make_mesh((4, 2), ("data", "model"))
    tree = _tree(mesh)
    directory = as_path(f"{fake_gcs.url}/ckpts")
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=True),
                               item_names=("state",)) as mgr:
        mgr.save(4, args=ocp.args.Composite(state=ocp.args.StandardSave(tree)))
        mgr.wait_until_finished()
    # Step 6, half-written: every object of step 4 but the completion markers.
    for src in (directory / "4").glob("*"):
        if src.name != "commit_success.txt" and src.is_file():
            src.copy(directory / "6" / src.name)
    (directory / "6" / "state" / "_METADATA").write_text((directory / "4" / "state" / "_METADATA").read_text())
    (directory / "6" / "state" / "stale").write_text("from the killed save")
    assert "ckpts/6/state/_METADATA" in fake_gcs.object_names()
    with ocp.CheckpointManager(directory, item_names=("state",)) as mgr:
        assert mgr.all_steps() == [4] and mgr.latest_step() == 4
        # Resuming from 4 and reaching step 6 again: the save replaces the partial directory whole.
        tree["step"] = jnp.asarray(6, jnp.int32)
        mgr.save(6, args=ocp.args.Composite(state=ocp.args.StandardSave(tree)))
        mgr.wait_until_finished()
        assert mgr.all_steps() == [4, 6]
    names = fake_gcs.object_names()
    assert "ckpts/6/commit_success.txt" in names and "ckpts/6/state/stale" not in names


def test_atomic_write_text_on_gcs(fake_gcs):
    target = f"{fake_gcs.url}/run/config.json"
    atomic_write_text(target, '{"v": 1}\n')
    atomic_write_text(target, '{"v": 2}\n')
    assert as_path(target).read_text() == '{"v": 2}\n'
    assert (fake_gcs.objects_dir / "run" / "config.json").read_text() == '{"v": 2}\n'
    assert fake_gcs.object_names() == ["run/config.json"]  # no temporary objects left behind
    uploads = [p for m, p in fake_gcs.server.requests if m in ("POST", "PUT") and "/upload/" in p]
    assert uploads and all("config.json" in p or "upload_id" in p for p in uploads)


def test_as_path_keeps_uris_and_makes_local_paths_absolute(tmp_path):
    assert str(as_path("gs://test-bucket/a/b")) == "gs://test-bucket/a/b"
    assert str(as_path("gs://test-bucket/a") / "c") == "gs://test-bucket/a/c"
    assert is_remote(as_path("gs://test-bucket/a")) and not is_remote(as_path("run"))
    assert as_path("run") == epath.Path(os.getcwd()) / "run"
    assert pathlib.Path(as_path("run")).is_absolute()
    with pytest.raises(ValueError, match="unsupported storage scheme 'http://'"):
        as_path("http://example.com/run")


def test_append_text_keeps_every_line_where_open_a_would_truncate(fake_gcs, tmp_path):
    path = as_path(f"{fake_gcs.url}/run/metrics.jsonl")
    for step in (1, 2, 3):
        append_text(path, f'{{"step": {step}}}\n')
    assert (fake_gcs.objects_dir / "run" / "metrics.jsonl").read_text().splitlines() == [
        '{"step": 1}', '{"step": 2}', '{"step": 3}']
    # Why append_text exists: gcsfs turns open("a") into open("w") with only a warning.
    with pytest.warns(UserWarning, match="Append mode"), path.open("a") as f:
        f.write('{"step": 4}\n')
    assert path.read_text() == '{"step": 4}\n', "gcsfs now appends: open('a') could replace append_text on gs://"

    local = tmp_path / "metrics.jsonl"
    append_text(local, "a\n")
    append_text(local, "b\n")
    assert local.read_text() == "a\nb\n"


def test_copy_tree_and_local_dir_between_local_and_gcs(fake_gcs, tmp_path):
    src = tmp_path / "tokenizer"
    (src / "sub").mkdir(parents=True)
    (src / "tokenizer.json").write_text('{"model": {}}')
    (src / "sub" / "merges.txt").write_text("a b\n")
    (src / "manifest.json").write_text("{}")
    remote = f"{fake_gcs.url}/run/tokenizer"
    assert copy_tree(src, remote, last=("manifest.json",)) == ["sub/merges.txt", "tokenizer.json", "manifest.json"]
    uploads = [p for m, p in fake_gcs.server.requests if m == "POST" and "name=" in p]
    assert "manifest.json" in uploads[-1]  # the completion marker went last
    assert (fake_gcs.objects_dir / "run" / "tokenizer" / "sub" / "merges.txt").read_text() == "a b\n"
    # The recursive listing that epath's rglob refuses on gs://.
    expected = ["manifest.json", "sub/merges.txt", "tokenizer.json"]
    assert [rel for rel, _ in files_under(remote)] == [rel for rel, _ in files_under(src)] == expected
    assert [str(p) for _, p in files_under(remote)] == [f"{remote}/{rel}" for rel in expected]

    with local_dir(remote) as local:
        assert isinstance(local, pathlib.Path) and not str(local).startswith("gs:")
        assert (local / "tokenizer.json").read_text() == '{"model": {}}'
        assert (local / "sub" / "merges.txt").read_text() == "a b\n"
    assert not local.exists()  # the download is temporary
    with local_dir(src) as same:
        assert same == src
    with pytest.raises(FileNotFoundError), local_dir(f"{fake_gcs.url}/missing"):
        pass


def test_array_record_reads_shards_from_gcs(fake_gcs, tmp_path):
    """ArrayRecord (the shard format) has its own GCS reader: CLOUD_STORAGE_EMULATOR_ENDPOINT points it at the fake."""
    from array_record.python.array_record_data_source import ArrayRecordDataSource
    from array_record.python.array_record_module import ArrayRecordWriter

    records = [f"doc-{i}-".encode() * 50 for i in range(40)]
    writer = ArrayRecordWriter(str(tmp_path / "train-00000.arecord"), "group_size:1")
    for r in records:
        writer.write(r)
    writer.close()
    copy_tree(tmp_path, f"{fake_gcs.url}/shards")
    fake_gcs.server.requests.clear()
    source = ArrayRecordDataSource([f"{fake_gcs.url}/shards/train-00000.arecord"])
    assert len(source) == 40 and source[0] == records[0] and source[39] == records[39]
    assert any(m == "GET" and "train-00000.arecord" in p and "alt=media" in p for m, p in fake_gcs.server.requests)


def _losses_from(text: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, text.splitlines()) if "loss" in r}


@pytest.mark.slow
def test_lmtrain_train_on_a_gcs_workdir_resumes_like_a_local_run(fake_gcs, tmp_path, builtin_shards):
    """`lmtrain train --workdir=gs://...`, shards and tokenizer on gs:// too: it trains, checkpoints, stops,
    resumes, and every step's loss equals an uninterrupted run in a local WORKDIR."""
    from lmtrain.cli import main

    tok, shards = builtin_shards
    copy_tree(tok, f"{fake_gcs.url}/data/tokenizer")
    copy_tree(shards, f"{fake_gcs.url}/data/shards")
    # Few steps and no eval or sample: each run's cost is compiling; what is tested is the storage.
    args = ["train", "--config=tiny:smoke", "--no-progress", "--config.data.source=shards",
            f"--config.data.tokenizer_dir={fake_gcs.url}/data/tokenizer", f"--config.data.shards_dir={fake_gcs.url}/data/shards",
            "--config.model.vocab_size=1024", "--config.train.steps=5", "--config.train.log_every=1",
            "--config.train.eval_every=0", "--config.train.sample_tokens=0", "--config.checkpoint.every=2"]
    run = f"{fake_gcs.url}/run"
    assert main([*args, f"--workdir={run}", "--stop-at-step=3"]) == 0
    assert "run/checkpoints/3/commit_success.txt" in fake_gcs.object_names()
    assert main([*args, f"--workdir={run}"]) == 0
    assert main([*args, f"--workdir={tmp_path / 'local'}"]) == 0

    objects = fake_gcs.objects_dir / "run"
    resumed = _losses_from((objects / "metrics.jsonl").read_text())
    straight = _losses_from((tmp_path / "local" / "metrics.jsonl").read_text())
    assert sorted(resumed) == sorted(straight) == list(range(1, 6))
    assert resumed == straight
    assert json.loads((objects / "config.json").read_text())["data"]["shards_dir"] == f"{fake_gcs.url}/data/shards"
    names = fake_gcs.object_names()
    assert "run/checkpoints/5/commit_success.txt" in names
    assert any(n.startswith("run/checkpoints/5/state/") for n in names)
    assert "run/lmtrain.lock" not in names  # each run took the WORKDIR's lock object and released it
    assert "run/loss_curve.png" in names and any(n.startswith("run/tensorboard/events.out.tfevents") for n in names)
    assert not (REPO / "gs:").exists()  # and not in the cwd: the no_local_gs_dir fixture checks it
