"""--input on gs:// (issue 22: a cluster's workers read the corpus where it lies): the same documents, in the same
order, as from local files, through a glob, for both engines (the fake GCS of tests/gcs_fake.py)."""

from __future__ import annotations

import json

import pytest

from lmtrain.paths import as_path
from lmtrain.prep import shard_data
from tests.prep.test_beam_engine import DIRECT, corpus, manifest_of, stored_documents  # noqa: F401 - corpus: a fixture
from tests.prep.test_shard_data import tokenizer_dir  # noqa: F401 - a fixture


@pytest.mark.parametrize("engine", ["local", "beam"])
def test_gcs_input_glob_reads_the_same_documents(engine, fake_gcs, corpus, tokenizer_dir, tmp_path):  # noqa: F811
    for path in corpus:
        as_path(path).copy(as_path(f"{fake_gcs.url}/corpus/{path.name}"))
    common = ["--tokenizer", str(tokenizer_dir), "--quiet", "--workers", "1", "--val-fraction", "0.2", "--runner",
              engine, f"--beam-options={DIRECT}"]
    assert shard_data.main(["--input", f"{fake_gcs.url}/corpus/*.jsonl", "--output", str(tmp_path / "gcs"),
                            *common]) == 0
    assert shard_data.main(["--input", *map(str, corpus), "--output", str(tmp_path / "local"), *common]) == 0
    remote, local = manifest_of(tmp_path / "gcs"), manifest_of(tmp_path / "local")
    assert [f[0] for f in remote["fingerprint"]["corpus"]["file_stats"]] == [
        f"{fake_gcs.url}/corpus/{p.name}" for p in corpus]
    assert remote["cleaning"] == local["cleaning"] and remote["splits"] == json.loads(json.dumps(local["splits"]))
    assert stored_documents(tmp_path / "gcs") == stored_documents(tmp_path / "local")
