"""tools/shard_data.py --runner beam (issue 22) on Beam's DirectRunner: the same shards' content and manifest
as the local engine, deterministic, with a worker failure retried, and the local engine's errors.

Shard boundaries differ between the engines (the Beam engine buckets documents by a hash of their corpus
position, the local one cuts the corpus in order), so documents are compared as a multiset of (split,
content hash of everything stored for the document), and manifests without their shard lists.
"""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader

from lmtrain.data.formats import get_format
from lmtrain.data.shard_files import MANIFEST
from lmtrain.data.shards import verify_shards
from lmtrain.paths import as_path
from lmtrain.prep import beam_output, beam_stages, shard_data
from lmtrain.prep.cleaning import CleanedDocument, CleaningOptions, Deduplicator, dropped_near_duplicates, lsh_bands
from tests.prep.test_shard_data import make_docs, tokenizer_dir, write_jsonl  # noqa: F401 - tokenizer_dir: a fixture

DIRECT = "--runner=DirectRunner"
RETRYING = "--runner=BundleBasedDirectRunner"  # the DirectRunner that retries a failed bundle (up to 4 times)


def run(engine: str, inputs: list[Path], tok: Path, out: Path | str, *extra: str, beam_options: str = DIRECT) -> int:
    files = [str(p) for p in inputs]
    return shard_data.main(["--input", *files, "--tokenizer", str(tok), "--output", str(out), "--quiet",
                            "--workers", "1", "--runner", engine, f"--beam-options={beam_options}", *extra])


def stored_documents(out: Path) -> Counter:
    """(split, sha256 of every array stored for the document) of each document, as a multiset."""
    manifest = json.loads((out / MANIFEST).read_text())
    fmt = get_format(manifest.get("example_format", "text"))
    docs: Counter = Counter()
    for split, info in manifest["splits"].items():
        for entry in info["shards"]:
            reader = ArrayRecordReader(str(out / entry["file"]))
            for record in reader.read_all():
                arrays = fmt.decode(record, manifest["token_dtype"])
                digest = hashlib.sha256(b"".join(np.asarray(arrays[k]).tobytes() for k in sorted(arrays)))
                docs[split, digest.hexdigest()] += 1
            reader.close()
    return docs


def comparable(manifest: dict) -> dict:
    """A manifest without what may differ between two runs into two directories: the shard lists (with
    --runner beam, the shard boundaries), the time taken, and the output directory itself."""
    manifest = copy.deepcopy(manifest)
    manifest.pop("seconds")
    manifest["options"].pop("output", None)
    for info in manifest["splits"].values():
        info.pop("shards")
    return manifest


def without_time(manifest: dict) -> dict:
    manifest = copy.deepcopy(manifest)
    manifest.pop("seconds")
    manifest["options"].pop("output", None)
    return manifest


def manifest_of(out: Path) -> dict:
    return json.loads((out / MANIFEST).read_text())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[Path]:
    """Two files (two parallel reads) with exact and near duplicates across them, short and empty documents,
    and documents longer than --max-doc-chars."""
    root = tmp_path_factory.mktemp("beam_corpus")
    docs = make_docs(160, seed=3)
    near = [d.replace("Document", "Doc.", 1) + " extra" for d in docs[:25]]  # a few shingles changed
    long_doc = " ".join(docs[100:106])
    first = write_jsonl(root / "a.jsonl", [*docs[:90], "tiny", "", *docs[:10], long_doc])
    second = write_jsonl(root / "b.jsonl", [*docs[90:], *near, *docs[80:95], "  \n  "])
    return [first, second]


TEXT_OPTIONS = ("--val-fraction", "0.2", "--shard-mb", "0.004", "--max-doc-chars", "2000")


def test_text_beam_output_equals_local(corpus, tokenizer_dir, tmp_path):  # noqa: F811
    assert run("local", corpus, tokenizer_dir, tmp_path / "local", *TEXT_OPTIONS) == 0
    assert run("beam", corpus, tokenizer_dir, tmp_path / "beam", *TEXT_OPTIONS) == 0
    local, beam = manifest_of(tmp_path / "local"), manifest_of(tmp_path / "beam")
    cleaning = local["cleaning"]
    assert cleaning["removed_exact_dup"] and cleaning["removed_near_dup"] and cleaning["removed_too_short"]
    assert local["long_documents"]["split"] == 1
    assert comparable(beam) == comparable(local)  # totals, cleaning counts, fingerprint, options
    assert stored_documents(tmp_path / "beam") == stored_documents(tmp_path / "local")  # kept set, tokens, split
    verify_shards(tmp_path / "beam")  # sizes and sha256 as listed
    assert not (tmp_path / "beam" / beam_output.STAGING).exists()
    # the trainer cannot tell them apart: a local run over the Beam output finds it complete
    assert run("local", corpus, tokenizer_dir, tmp_path / "beam", *TEXT_OPTIONS) == 0
    assert manifest_of(tmp_path / "beam") == beam


def test_two_beam_runs_give_identical_manifests(corpus, tokenizer_dir, tmp_path):  # noqa: F811
    for name in ("one", "two"):
        assert run("beam", corpus, tokenizer_dir, tmp_path / name, *TEXT_OPTIONS) == 0
    one, two = manifest_of(tmp_path / "one"), manifest_of(tmp_path / "two")
    assert len(one["splits"]["train"]["shards"]) > 1
    assert without_time(one) == without_time(two)  # shard names, sizes and sha256 included


def test_near_duplicate_recall_on_planted_pairs_matches_local(tokenizer_dir, tmp_path):  # noqa: F811
    originals = make_docs(60, seed=7)
    rng = np.random.default_rng(7)
    planted = []
    for doc in originals[:30]:  # one word changed: most pairs stay above the 0.8 threshold, not all
        words = doc.split()
        words[int(rng.integers(2, len(words)))] = "changed"
        planted.append(" ".join(words))
    data = write_jsonl(tmp_path / "d.jsonl", [*originals, *planted])
    recall = {}
    for engine in ("local", "beam"):
        assert run(engine, [data], tokenizer_dir, tmp_path / engine, "--val-fraction", "0") == 0
        recall[engine] = manifest_of(tmp_path / engine)["cleaning"]["removed_near_dup"] / len(planted)
    assert 0.5 < recall["beam"] == recall["local"]
    assert stored_documents(tmp_path / "beam") == stored_documents(tmp_path / "local")  # the same ones dropped


def test_dropped_near_duplicates_is_the_corpus_order_rule():
    # 1 ~ 2 ~ 3 but 1 !~ 3: 2 goes (it follows the kept 1), so 3 stays (its only earlier match was dropped)
    assert dropped_near_duplicates([(1, 2), (2, 3)]) == {2}
    assert dropped_near_duplicates([(1, 2), (2, 3), (1, 3)]) == {2, 3}
    assert dropped_near_duplicates([(5, 9), (2, 5)]) == {5}


def sft_records(n: int) -> list[dict]:
    rng = np.random.default_rng(1)
    words = "alpha beta gamma delta the of and to in is model data".split()
    return [{"prompt": f"q{i} " + " ".join(rng.choice(words, int(rng.integers(2, 12)))) + "\n",
             "completion": " ".join(rng.choice(words, int(rng.integers(1, 30))))} for i in range(n)]


def classify_records(n: int) -> list[dict]:
    rng = np.random.default_rng(2)
    words = "alpha beta gamma delta the of and to in is model data".split()
    labels = ["positive", "negative", "neutral"]
    return [{"text": f"r{i} " + " ".join(rng.choice(words, int(rng.integers(3, 40)))), "label": labels[i % 3]}
            for i in range(n)]


@pytest.mark.parametrize("fmt", ["sft", "classify"])
def test_record_formats_beam_output_equals_local(fmt, tokenizer_dir, tmp_path):  # noqa: F811
    records = sft_records(80) if fmt == "sft" else classify_records(90)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    extra = ("--format", fmt, "--seq-len", "24", "--shard-mb", "0.001", "--val-fraction", "0.2",
             "--test-fraction", "0.1")
    for engine in ("local", "beam"):
        assert run(engine, [data], tokenizer_dir, tmp_path / engine, *extra) == 0
    local, beam = manifest_of(tmp_path / "local"), manifest_of(tmp_path / "beam")
    assert local["examples"]["truncated"] > 0  # the encoder's counts are summed over the workers
    assert comparable(beam) == comparable(local)  # totals, label counts, labels, truncation counts
    assert stored_documents(tmp_path / "beam") == stored_documents(tmp_path / "local")
    verify_shards(tmp_path / "beam")


def test_worker_failure_is_retried_and_output_still_equal(corpus, tokenizer_dir, tmp_path, monkeypatch):  # noqa: F811
    marker = tmp_path / "failed-once"
    monkeypatch.setenv(beam_stages.FAIL_ONCE, str(marker))
    assert run("beam", corpus, tokenizer_dir, tmp_path / "beam", *TEXT_OPTIONS, beam_options=RETRYING) == 0
    assert marker.exists()  # the hook did raise, in the middle of writing a shard
    monkeypatch.delenv(beam_stages.FAIL_ONCE)
    assert run("local", corpus, tokenizer_dir, tmp_path / "local", *TEXT_OPTIONS) == 0
    assert comparable(manifest_of(tmp_path / "beam")) == comparable(manifest_of(tmp_path / "local"))
    assert stored_documents(tmp_path / "beam") == stored_documents(tmp_path / "local")


def test_failed_pipeline_leaves_no_finished_output_and_a_rerun_completes(corpus, tokenizer_dir, tmp_path,  # noqa: F811
                                                                        monkeypatch):
    marker, out = tmp_path / "failed-once", tmp_path / "beam"
    monkeypatch.setenv(beam_stages.FAIL_ONCE, str(marker))
    args = shard_data.parse_args(["--input", *map(str, corpus), "--tokenizer", str(tokenizer_dir), "--output",
                                  str(out), "--quiet", "--runner", "beam", f"--beam-options={DIRECT}", *TEXT_OPTIONS])
    with pytest.raises(RuntimeError, match="injected"):  # this runner does not retry: the pipeline fails
        shard_data.shard_corpus(args)
    assert not (out / MANIFEST).exists()
    with pytest.raises(Exception, match="manifest"):
        verify_shards(out)  # the trainer's check: not a finished shard directory
    assert run("beam", corpus, tokenizer_dir, out, *TEXT_OPTIONS) == 0  # the same command again
    verify_shards(out)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # staging and progress gone


@pytest.mark.parametrize("bad, fmt", [('{"text": "fine"}\n{"text": oops}\n', "text"),
                                      ('{"text": "a b c d", "label": "x"}\n{"label": "y"}\n', "classify")])
def test_bad_input_gives_the_local_engines_one_line_error(bad, fmt, tokenizer_dir, tmp_path, capsys):  # noqa: F811
    data = tmp_path / "bad.jsonl"
    data.write_text(bad, encoding="utf-8")
    errors = {}
    for engine in ("local", "beam"):
        out = tmp_path / engine
        assert run(engine, [data], tokenizer_dir, out, "--format", fmt, "--seq-len", "16") == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        errors[engine] = err.strip().splitlines()[-1]
        assert not out.exists()  # nothing written
    assert errors["beam"] == errors["local"]
    assert f"{data}:2" in errors["beam"]


def test_runner_beam_is_off_by_default():
    args = shard_data.parse_args(["--builtin", "--tokenizer", "t", "--output", "o"])
    assert args.runner == "local"


def test_the_local_engine_imports_no_beam():
    """apache_beam is the [beam] extra: shard_data (and the Beam engine it dispatches to) import it only when a
    Beam pipeline runs, so the base install runs the local engine. A fresh interpreter, as a user's has."""
    probe = ("import sys; import lmtrain.prep.shard_data, lmtrain.prep.beam_engine, lmtrain.prep.beam_stages; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] == 'apache_beam'))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout
    assert out.strip() == "[]"


@pytest.mark.usefixtures("fake_gcs")
def test_gcs_output_is_staged_by_workers_and_published_manifest_last(fake_gcs, corpus, tokenizer_dir, tmp_path,  # noqa: F811
                                                                      monkeypatch):
    remote = f"{fake_gcs.url}/shards"
    monkeypatch.setenv(beam_stages.FAIL_ONCE, str(tmp_path / "failed-once"))
    with pytest.raises(RuntimeError, match="injected"):  # a failed run: shards staged, no manifest
        run("beam", corpus, tokenizer_dir, remote, *TEXT_OPTIONS)
    names = fake_gcs.object_names()
    assert "shards/manifest.json" not in names and "shards/.progress.json" in names
    assert run("beam", corpus, tokenizer_dir, remote, *TEXT_OPTIONS) == 0  # the same command completes
    names = fake_gcs.object_names()
    assert "shards/manifest.json" in names and not [n for n in names if "/." in n]  # staging and progress gone
    verify_shards(remote)
    monkeypatch.delenv(beam_stages.FAIL_ONCE)
    assert run("beam", corpus, tokenizer_dir, tmp_path / "local", *TEXT_OPTIONS) == 0
    on_gcs = json.loads((as_path(remote) / MANIFEST).read_text())
    assert without_time(on_gcs) == without_time(manifest_of(tmp_path / "local"))  # byte-equal shards, same names


@pytest.mark.parametrize("source", [("--builtin", "--max-docs", "40"),
                                    pytest.param(("--builtin-task", "classify"), marks=pytest.mark.heavy)])  # ~25 s
def test_builtin_sources_on_beam_equal_local(source, tokenizer_dir, tmp_path):  # noqa: F811
    """One read for a source that is not files (the built-in corpus, --max-docs, a built-in task)."""
    common = ["--tokenizer", str(tokenizer_dir), "--quiet", "--workers", "1", *source, "--shard-mb", "0.01"]
    if source[0] == "--builtin-task":
        common += ["--seq-len", "32"]
    for engine in ("local", "beam"):
        assert shard_data.main([*common, "--output", str(tmp_path / engine), "--runner", engine,
                                f"--beam-options={DIRECT}"]) == 0
    assert comparable(manifest_of(tmp_path / "beam")) == comparable(manifest_of(tmp_path / "local"))
    assert stored_documents(tmp_path / "beam") == stored_documents(tmp_path / "local")


def test_tfds_split_is_read_in_ranges_and_equals_local(tokenizer_dir, tmp_path, monkeypatch):  # noqa: F811
    tfds = pytest.importorskip("tensorflow_datasets")
    docs = make_docs(30, seed=9) + make_docs(5, seed=9)  # exact duplicates across ranges

    class LmtrainBeamTinyText(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, d in enumerate(docs):
                yield i, {"text": d}

    LmtrainBeamTinyText(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
    monkeypatch.setattr(beam_stages, "TFDS_RANGE", 8)  # 5 parallel reads of 35 records
    source = ["--tfds", "lmtrain_beam_tiny_text", "--tfds-data-dir", str(tmp_path / "tfds")]
    spec = shard_data.corpus_from_args(shard_data.parse_args([*source, "--tokenizer", "t", "--output", "o"]))
    assert [span for _, _, span in beam_stages.read_units(spec)] == [(0, 8), (8, 16), (16, 24), (24, 32), (32, 35)]
    for engine in ("local", "beam"):
        assert shard_data.main([*source, "--tokenizer", str(tokenizer_dir), "--output", str(tmp_path / engine),
                                "--quiet", "--workers", "1", "--val-fraction", "0.2", "--runner", engine,
                                f"--beam-options={DIRECT}"]) == 0
    local = manifest_of(tmp_path / "local")
    assert local["cleaning"]["removed_exact_dup"] == 5
    assert comparable(manifest_of(tmp_path / "beam")) == comparable(local)
    assert stored_documents(tmp_path / "beam") == stored_documents(tmp_path / "local")


def test_band_group_by_and_walk_drop_what_the_corpus_order_deduplicator_drops():
    """Random signatures over a small alphabet: many collisions, chains and clusters of near duplicates."""
    opts = CleaningOptions(exact_dedup=False, near_dedup=True, near_dup_threshold=0.5, num_perm=16)
    bands, rows = lsh_bands(opts.num_perm, opts.near_dup_threshold)
    rng = np.random.default_rng(0)
    signatures = [rng.integers(0, 3, opts.num_perm).astype(np.uint32) for _ in range(300)]
    local = Deduplicator(opts)
    expected = {i for i, s in enumerate(signatures) if local.is_duplicate(CleanedDocument("x", signature=s))}
    buckets: dict = {}
    for i, s in enumerate(signatures):  # the band group-by, as the pipeline's "group bands"
        for key, member in beam_stages.band_items((i, CleanedDocument("x", signature=s), 0), bands, rows):
            buckets.setdefault(key, []).append(member)
    edges = {e for bucket in buckets.items() for e in beam_stages.bucket_edges(bucket, opts.near_dup_threshold)}
    assert 30 < len(expected) < 270  # neither nothing nor everything is a near duplicate
    assert dropped_near_duplicates(edges) == expected
