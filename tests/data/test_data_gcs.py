"""The data toolchain on gs:// (the local fake GCS of tests/gcs_fake.py): a tokenizer and shards written to
gs:// by the tools, read in place by the loaders, and equal to the same data made locally."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmtrain.data import shards as shards_lib
from lmtrain.data.tokenizer import load_tokenizer
from lmtrain.paths import as_path
from tools import shard_data, train_tokenizer

WORDS = "the of and to in is for on with as by at from train model token data alpha beta gamma delta".split()


@pytest.fixture
def no_local_gs_dir(tmp_path, monkeypatch):
    """Run in an empty cwd and fail if a local `gs:` directory appears (what Path('gs://b').resolve() writes to)."""
    monkeypatch.chdir(tmp_path)
    yield
    assert not (tmp_path / "gs:").exists()


@pytest.mark.usefixtures("no_local_gs_dir")
def test_tokenizer_and_shards_on_gcs_train_like_local_ones(fake_gcs, tmp_path, capsys):
    rng = np.random.default_rng(0)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"doc {i} " + " ".join(rng.choice(WORDS, size=40))}) + "\n"
                              for i in range(80)), encoding="utf-8")
    tok_uri, shards_uri = f"{fake_gcs.url}/tok", f"{fake_gcs.url}/shards"
    assert train_tokenizer.main(["--input", str(corpus), "--vocab-size", "300", "--output", tok_uri]) == 0
    assert "tok/tokenizer.json" in fake_gcs.object_names()
    common = ["--input", str(corpus), "--workers", "1", "--quiet", "--shard-mb", "0.002", "--val-fraction", "0.1"]
    staging = tmp_path / "staging"
    assert shard_data.main([*common, "--tokenizer", tok_uri, "--output", shards_uri, "--staging-dir",
                            str(staging)]) == 0
    assert not staging.exists()  # removed once uploaded
    names = fake_gcs.object_names()
    assert "shards/manifest.json" in names and sum(n.endswith(".array_record") for n in names) > 2
    assert shard_data.main([*common, "--tokenizer", tok_uri, "--output", shards_uri]) == 0
    assert "already complete" in capsys.readouterr().out

    local_tok = tmp_path / "tok"
    assert train_tokenizer.main(["--input", str(corpus), "--vocab-size", "300", "--output", str(local_tok)]) == 0
    local = tmp_path / "shards"
    assert shard_data.main([*common, "--tokenizer", str(local_tok), "--output", str(local)]) == 0

    shards_lib.verify_shards(shards_uri)
    shards_lib.check_compatibility(shards_uri, tok_uri, 300)
    assert len(load_tokenizer(tok_uri)) == len(load_tokenizer(local_tok))
    remote_it = shards_lib.ShardedTrainIterator(shards_uri, 16, 4, seed=1, prefetch=0)
    local_it = shards_lib.ShardedTrainIterator(local, 16, 4, seed=1, prefetch=0)
    for _ in range(5):
        a, b = next(remote_it), next(local_it)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    remote_it.close()
    local_it.close()
    remote_eval = list(shards_lib.shard_eval_batches(shards_uri, 16, 4))
    assert len(remote_eval) == len(list(shards_lib.shard_eval_batches(local, 16, 4))) > 0

    # a foreign gs:// output is refused without --force, as a local one is
    (as_path(f"{fake_gcs.url}/other") / "notes.txt").write_text("mine")
    assert shard_data.main([*common, "--tokenizer", tok_uri, "--output", f"{fake_gcs.url}/other"]) == 2
    assert "is not empty (notes.txt)" in capsys.readouterr().err
    assert (as_path(f"{fake_gcs.url}/other") / "notes.txt").read_text() == "mine"
