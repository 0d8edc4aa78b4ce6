"""tools/shard_data.py: token accounting against the manifest, deterministic split, dedup, crash-safe
resume, and clear errors on bad input that leave an existing output untouched."""

from __future__ import annotations

import json
import os
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from lmtrain.data.shard_writer import PROGRESS, ShardError, ShardFileWriter, unlink_inside
from lmtrain.data.shards import MANIFEST, token_dtype, verify_shards
from lmtrain.prep.cleaning import CleaningOptions, clean_document, minhash_signature, normalize_text
from tests.core_fixtures import tmpfs
from tools import shard_data, train_tokenizer

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega the of and to in is for on with as by at from train model token data").split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"Document {i}: " + " ".join(rng.choice(WORDS, size=int(rng.integers(30, 120)))) + "."
            for i in range(n)]


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tok")
    corpus = write_jsonl(root / "corpus.jsonl", make_docs(200))
    assert train_tokenizer.main(["--input", str(corpus), "--vocab-size", "300", "--output", str(root / "tok")]) == 0
    return root / "tok"


def shard(tokenizer_dir: Path, inputs: list[Path] | Path, out: Path, *extra: str) -> int:
    inputs = inputs if isinstance(inputs, list) else [inputs]
    return shard_data.main(["--input", *map(str, inputs), "--tokenizer", str(tokenizer_dir), "--output", str(out),
                            "--workers", "1", "--quiet", *extra])


def read_shard(path: Path, dtype) -> list[np.ndarray]:
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(str(path))
    records = [np.frombuffer(r, dtype=dtype) for r in reader.read_all()]
    reader.close()
    return records


def read_split(out: Path, split: str) -> list[np.ndarray]:
    manifest = json.loads((out / MANIFEST).read_text())
    docs = []
    for entry in manifest["splits"][split]["shards"]:
        docs.extend(read_shard(out / entry["file"], manifest["token_dtype"]))
    return docs


def snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def interrupted_after_two_shards(monkeypatch, tokenizer_dir, corpus, out, *args) -> list[str]:
    """Run shard_data until a Ctrl-C arrives as the third shard is finished; the names of the two finished."""
    finish = ShardFileWriter.finish
    calls = []

    def dying_finish(self):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(self.path.name)
        return finish(self)

    monkeypatch.setattr(ShardFileWriter, "finish", dying_finish)
    with pytest.raises(KeyboardInterrupt):
        shard(tokenizer_dir, corpus, out, *args)
    monkeypatch.setattr(ShardFileWriter, "finish", finish)
    return calls


def test_every_token_is_in_exactly_one_shard_and_totals_match_the_manifest(tokenizer_dir, tmp_path):
    from tokenizers import Tokenizer

    docs = make_docs(150, seed=1)
    corpus = write_jsonl(tmp_path / "c.jsonl", docs)
    out = tmp_path / "shards"
    assert shard(tokenizer_dir, corpus, out, "--no-clean", "--shard-mb", "0.002", "--val-fraction", "0.2") == 0
    manifest = json.loads((out / MANIFEST).read_text())
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    eos = manifest["eos_id"]
    expected = Counter(tuple(tok.encode(d, add_special_tokens=False).ids) + (eos,) for d in docs)
    got = Counter()
    for split in ("train", "validation"):
        info = manifest["splits"][split]
        assert len(info["shards"]) > 1  # the tiny --shard-mb forces several shards per split
        records = []
        for entry in info["shards"]:
            shard_docs = read_shard(out / entry["file"], manifest["token_dtype"])
            assert entry["documents"] == len(shard_docs)
            assert entry["tokens"] == sum(len(d) for d in shard_docs)
            records.extend(shard_docs)
        assert info["documents"] == len(records) and info["tokens"] == sum(len(d) for d in records)
        assert all(d[-1] == eos and eos not in d[:-1] for d in records)
        got.update(tuple(int(t) for t in d) for d in records)
    assert got == expected  # each document once, in one shard of one split, nothing lost or added
    assert manifest["token_dtype"] == "uint16"
    assert manifest["cleaning"]["kept"] == 150
    verify_shards(out)


def test_split_is_a_function_of_the_document_only(tokenizer_dir, tmp_path):
    docs = make_docs(120, seed=2)
    a = shard(tokenizer_dir, write_jsonl(tmp_path / "a.jsonl", docs), tmp_path / "a", "--val-fraction", "0.25")
    b = shard(tokenizer_dir, write_jsonl(tmp_path / "b.jsonl", docs[::-1] + make_docs(30, seed=9)),
              tmp_path / "b", "--val-fraction", "0.25")
    assert a == b == 0
    val_a = {tuple(d) for d in read_split(tmp_path / "a", "validation")}
    val_b = {tuple(d) for d in read_split(tmp_path / "b", "validation")}
    assert 10 < len(val_a) < 60
    assert val_a <= val_b  # reordering and adding documents never moves one across the split
    assert not val_a & {tuple(d) for d in read_split(tmp_path / "b", "train")}


def test_dedup_removes_exact_and_near_duplicates_and_keeps_distinct(tokenizer_dir, tmp_path):
    docs = make_docs(40, seed=3)
    words = docs[5].split()
    near = " ".join(words[:-3] + ["omega", "omega", "omega."])  # 3 of ~80 words changed: Jaccard ~0.9
    corpus = docs + [docs[0], "  " + docs[1].replace(" ", "   ") + "\n\n", near, "", "tiny"]
    out = tmp_path / "shards"
    assert shard(tokenizer_dir, write_jsonl(tmp_path / "c.jsonl", corpus), out, "--val-fraction", "0") == 0
    report = json.loads((out / MANIFEST).read_text())["cleaning"]
    assert report == {"read": 45, "kept": 40, "removed_empty": 1, "removed_too_short": 1, "removed_exact_dup": 2,
                      "removed_near_dup": 1}
    assert len(read_split(out, "train")) == 40


def test_minhash_estimates_jaccard():
    a = " ".join(f"w{i}" for i in range(400))
    b = " ".join(f"w{i}" for i in range(40, 440))  # 356 of 444 shingles shared: Jaccard ~0.80
    c = " ".join(f"v{i}" for i in range(400))
    sa, sb, sc = (minhash_signature(t, 256, 5) for t in (a, b, c))
    assert abs(np.mean(sa == sb) - 356 / 444) < 0.08
    assert np.mean(sa == sc) < 0.05
    assert normalize_text("a\u00a0 b\t\tc \r\n\n\n\nd\x07 ", "NFKC") == "a b c\n\nd"
    assert clean_document("   \n\t", CleaningOptions()).reason == "empty"


def test_parallel_cleaning_gives_the_same_shards(tokenizer_dir, tmp_path):
    docs = make_docs(100, seed=4)
    corpus = write_jsonl(tmp_path / "c.jsonl", docs + docs[:10])
    assert shard(tokenizer_dir, corpus, tmp_path / "one", "--batch-docs", "16") == 0
    assert shard(tokenizer_dir, corpus, tmp_path / "two", "--batch-docs", "16", "--workers", "2") == 0
    one, two = (json.loads((tmp_path / d / MANIFEST).read_text()) for d in ("one", "two"))
    assert one["splits"] == two["splits"] and one["cleaning"] == two["cleaning"]


def test_kill_mid_way_leaves_no_false_shard_and_rerun_skips_finished_ones(tokenizer_dir, tmp_path, monkeypatch):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_docs(200, seed=5))
    args = ("--shard-mb", "0.004", "--val-fraction", "0.1")
    assert shard(tokenizer_dir, corpus, tmp_path / "clean_run", *args) == 0
    reference = json.loads((tmp_path / "clean_run" / MANIFEST).read_text())["splits"]

    out = tmp_path / "killed"
    finish = ShardFileWriter.finish
    calls = []

    def dying_finish(self):
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process is stopped while a fourth shard is being written
        calls.append(self.path.name)
        return finish(self)

    monkeypatch.setattr(ShardFileWriter, "finish", dying_finish)
    with pytest.raises(KeyboardInterrupt):
        shard(tokenizer_dir, corpus, out, *args)
    monkeypatch.setattr(ShardFileWriter, "finish", finish)
    assert not (out / MANIFEST).exists()
    assert sorted(p.name for p in out.glob("*.array_record")) == sorted(calls)  # no partial shard under a real name
    assert not list(out.glob(".*.tmp-*"))
    mtimes = {name: (out / name).stat().st_mtime_ns for name in calls}

    rewritten = []
    monkeypatch.setattr(ShardFileWriter, "finish", lambda self: rewritten.append(self.path.name) or finish(self))
    assert shard(tokenizer_dir, corpus, out, *args) == 0
    assert not set(rewritten) & set(calls)  # finished shards were skipped ...
    assert all((out / n).stat().st_mtime_ns == t for n, t in mtimes.items())  # ... and not touched
    assert json.loads((out / MANIFEST).read_text())["splits"] == reference  # same bytes as an uninterrupted run
    verify_shards(out)
    assert not (out / PROGRESS).exists()


def test_rerun_of_a_complete_output_does_nothing(tokenizer_dir, tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_docs(30, seed=6))
    out = tmp_path / "shards"
    assert shard(tokenizer_dir, corpus, out) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert shard(tokenizer_dir, corpus, out) == 0
    printed = capsys.readouterr().out
    assert "already complete" in printed and f"kept the existing shards of {out}/{MANIFEST}" in printed
    assert "wrote" not in printed  # it wrote nothing
    assert snapshot(out) == before


@pytest.mark.parametrize("case", ["missing_file", "empty_corpus", "missing_field", "malformed_json", "other_options",
                                  "lone_surrogate", "deep_nesting"])
def test_bad_input_is_a_clear_error_and_leaves_existing_output_intact(tokenizer_dir, tmp_path, capsys, case):
    good = write_jsonl(tmp_path / "good.jsonl", make_docs(30, seed=7))
    out = tmp_path / "shards"
    assert shard(tokenizer_dir, good, out) == 0
    before = snapshot(out)
    capsys.readouterr()
    bad = tmp_path / "bad.jsonl"
    extra: tuple[str, ...] = ()
    if case == "missing_file":
        bad, message = tmp_path / "absent.jsonl", f"input file {tmp_path / 'absent.jsonl'} does not exist"
    elif case == "empty_corpus":
        write_jsonl(bad, ["", "  ", "short"])
        message = "corpus is empty after cleaning: 3 read, kept 0"
    elif case == "missing_field":
        bad.write_text('{"text": "a fine first document here"}\n{"title": "x"}\n', encoding="utf-8")
        message = f"{bad}:2: no field 'text'"
    elif case == "malformed_json":
        bad.write_text('{"text": "a fine first document here"}\n{"text": "unterminated\n', encoding="utf-8")
        message = f"{bad}:2: malformed JSON"
    elif case == "lone_surrogate":  # json accepts it, but it is not text: the tokenizer would fail on it
        bad.write_text('{"text": "a fine first document here"}\n{"text": "half a pair \\udc00 here"}\n')
        message = f"{bad}:2: the JSON holds a lone surrogate escape (\\udc00)"
    elif case == "deep_nesting":  # json recurses once per bracket
        bad.write_text('{"text": "a fine first document here"}\n' + "[" * 100_000 + "\n", encoding="utf-8")
        message = f"{bad}:2: JSON nested too deeply"
    else:
        bad, extra, message = good, ("--val-fraction", "0.5"), "holds shards made from other inputs or options"
    inputs = bad if case in ("empty_corpus", "other_options") else [good, bad]
    if case != "other_options":
        # the output holds another run's shards, so only --force lets the run start; an input error found
        # before the first shard file is created still leaves everything as it was
        extra = ("--force",)
    assert shard(tokenizer_dir, inputs, out, *extra) == 2
    assert message in capsys.readouterr().err
    assert snapshot(out) == before
    verify_shards(out)


def test_wide_vocab_uses_uint32_and_round_trips(tmp_path):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    writer = ShardFileWriter(tmp_path / "x.array_record", token_dtype(100_000))
    writer.write(np.array([1, 70_000, 99_999]))
    entry = writer.finish()
    assert entry["tokens"] == 3 and os.path.getsize(tmp_path / "x.array_record") == entry["bytes"]
    assert read_shard(tmp_path / "x.array_record", "<u4")[0].tolist() == [1, 70_000, 99_999]


def test_a_huge_single_line_is_split_into_pieces_of_bounded_size(tokenizer_dir, tmp_path, capsys):
    from tokenizers import Tokenizer

    rng = np.random.default_rng(11)
    line = " ".join(rng.choice(WORDS, size=6000))  # one ~35k-character document on a single line
    corpus = tmp_path / "one_line.txt"
    corpus.write_text(line + "\n", encoding="utf-8")
    out = tmp_path / "shards"
    assert shard(tokenizer_dir, corpus, out, "--max-doc-chars", "4000", "--val-fraction", "0", "--no-near-dedup") == 0
    assert "long documents: 1 longer than --max-doc-chars 4000 were split into" in capsys.readouterr().out
    manifest = json.loads((out / MANIFEST).read_text())
    pieces = read_split(out, "train")
    assert manifest["long_documents"] == {"max_doc_chars": 4000, "split": 1, "pieces": len(pieces)}
    assert len(pieces) >= len(line) // 4000 + 1
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    texts = [tok.decode(p[:-1].tolist()) for p in pieces]
    assert all(0 < len(t) <= 4000 for t in texts)
    assert " ".join(texts) == line  # cut at spaces only: no word is split, none lost
    assert shard(tokenizer_dir, corpus, tmp_path / "x", "--max-doc-chars", "-1") == 2


def test_minhash_in_chunks_equals_the_one_shot_product():
    from lmtrain.prep import cleaning

    text = " ".join(f"w{i % 3000}" for i in range(20000))  # ~3000 distinct shingles: several chunks of 1000
    chunked = cleaning.minhash_signature(text, 64)
    old_chunk, cleaning._MINHASH_CHUNK = cleaning._MINHASH_CHUNK, 1 << 30
    try:
        np.testing.assert_array_equal(cleaning.minhash_signature(text, 64), chunked)
        cleaning._MINHASH_CHUNK = 1000
        np.testing.assert_array_equal(cleaning.minhash_signature(text, 64), chunked)
    finally:
        cleaning._MINHASH_CHUNK = old_chunk


def test_user_files_in_the_output_are_never_overwritten_or_deleted(tokenizer_dir, tmp_path, capsys, monkeypatch):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_docs(120, seed=12))
    out = tmp_path / "shards"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "train-00000.array_record").write_bytes(b"my own file with a shard's name")
    before = snapshot(out)
    assert shard(tokenizer_dir, corpus, out) == 2
    err = capsys.readouterr().err
    assert f"output {out} is not empty (notes.txt, train-00000.array_record)" in err and "--force" in err
    assert snapshot(out) == before
    (out / "train-00000.array_record").unlink()
    assert shard(tokenizer_dir, corpus, out, "--force") == 0  # --force writes beside the user's other files
    assert (out / "notes.txt").read_text() == "mine"
    verify_shards(out)

    # an interrupted run: its temporaries carry the run id recorded in .progress.json; others are not its own
    resumed = tmp_path / "resumed"
    args = ("--shard-mb", "0.004", "--val-fraction", "0.1")
    interrupted_after_two_shards(monkeypatch, tokenizer_dir, corpus, resumed, *args)
    progress = json.loads((resumed / PROGRESS).read_text())
    (run_id,) = progress["run_ids"]
    killed_leftover = resumed / f".train-00002.array_record.tmp-{run_id}"  # what a SIGKILL would leave
    killed_leftover.write_bytes(b"partial")
    users = [resumed / ".train-00002.array_record.tmp-12345", resumed / ".cache.tmp-x"]
    for path in users:
        path.write_text("not the tool's")
    assert shard(tokenizer_dir, corpus, resumed, *args) == 0
    assert not killed_leftover.exists()
    assert all(path.read_text() == "not the tool's" for path in users)
    verify_shards(resumed)


def test_force_replaces_a_run_of_other_options_and_only_its_files(tokenizer_dir, tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_docs(150, seed=13))
    out = tmp_path / "shards"
    assert shard(tokenizer_dir, corpus, out, "--shard-mb", "0.002") == 0
    old_files = {p.name for p in out.glob("*.array_record")}
    (out / "README.txt").write_text("kept")
    assert shard(tokenizer_dir, corpus, out, "--shard-mb", "0.02") == 2  # other options: refused
    assert shard(tokenizer_dir, corpus, out, "--shard-mb", "0.02", "--force") == 0
    manifest = json.loads((out / MANIFEST).read_text())
    listed = {e["file"] for s in manifest["splits"].values() for e in s["shards"]}
    assert {p.name for p in out.glob("*.array_record")} == listed < old_files  # old shards gone, no stale one left
    assert (out / "README.txt").read_text() == "kept"
    verify_shards(out)


@pytest.mark.parametrize("record", [MANIFEST, PROGRESS])
def test_run_ids_of_an_edited_record_never_delete_outside_the_output(tokenizer_dir, tmp_path, monkeypatch, record):
    """Run ids read back from manifest.json / .progress.json go into a glob of temporaries to delete: ids
    not of the tool's 12-hex form ("*", "x/../../victim.txt") are ignored, so nothing else goes."""
    corpus = write_jsonl(tmp_path / "c.jsonl", make_docs(120, seed=14))
    out = tmp_path / "work" / "shards"
    args = ("--shard-mb", "0.004", "--val-fraction", "0.1")
    if record == MANIFEST:  # a finished run of other options, replaced with --force
        assert shard(tokenizer_dir, corpus, out, *args, "--no-near-dedup") == 0
        args += ("--force",)
    else:  # an interrupted run of the same options, resumed
        interrupted_after_two_shards(monkeypatch, tokenizer_dir, corpus, out, *args)
    data = json.loads((out / record).read_text())
    data["run_ids"] = [*data.get("run_ids", []), "x/../../victim.txt", "*"]
    (out / record).write_text(json.dumps(data))
    victim = tmp_path / "victim.txt"
    victim.write_text("outside")
    (out / ".d.tmp-x").mkdir()  # lets the traversing id's glob reach the parent directory
    users = [out / ".cache.tmp-mine", tmp_path / "work" / ".x.tmp-mine"]
    for path in users:
        path.write_text("not the tool's")
    assert shard(tokenizer_dir, corpus, out, *args) == 0
    assert victim.read_text() == "outside"
    assert all(path.read_text() == "not the tool's" for path in users)
    verify_shards(out)


def test_deleting_refuses_a_path_outside_the_output(tmp_path):
    (tmp_path / "out").mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("outside")
    with pytest.raises(ShardError, match="not a file inside the output"):
        unlink_inside(tmp_path / "out", tmp_path / "out" / ".." / "victim.txt")
    assert victim.exists()
    with pytest.raises(ShardError, match="not a file inside the output"):
        unlink_inside("gs://bucket/out", "gs://bucket/victim.txt")


def test_a_full_disk_is_a_one_line_error_and_the_rerun_finishes_the_same_shards(tokenizer_dir, tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_docs(3000, seed=15))  # ~400 KB of tokens
    args = ("--shard-mb", "0.05", "--val-fraction", "0.05")
    assert shard(tokenizer_dir, corpus, tmp_path / "reference", *args) == 0
    with tmpfs(tmp_path / "disk", "size=128k") as disk:
        out = disk / "shards"
        capsys.readouterr()
        assert shard(tokenizer_dir, corpus, out, *args) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"shard_data: error: the disk is full: writing shards to {out} failed.") and \
            len(err.strip().splitlines()) == 1, err
        assert not list(out.glob(".*.tmp-*")) and not (out / MANIFEST).exists()  # no half-written file is left
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
        assert shard(tokenizer_dir, corpus, out, *args) == 0
        assert snapshot(out) == snapshot(tmp_path / "reference") | {MANIFEST: (out / MANIFEST).read_bytes()}
        reference = json.loads((tmp_path / "reference" / MANIFEST).read_text())
        manifest = json.loads((out / MANIFEST).read_text())
        assert manifest["splits"] == reference["splits"]
        verify_shards(out)
