"""lmtrain.data.shards loaders: packing loses no token and labels segments and positions correctly,
data slices read disjoint data that is complete together (the same slice identical data), resume is exact, eval is deterministic,
and start-up checks catch a foreign tokenizer, a too-small vocab and corrupt shards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lmtrain.config import ConfigError
from lmtrain.data.shards import (
    MANIFEST,
    ShardedTrainIterator,
    ShardError,
    check_compatibility,
    load_manifest,
    shard_eval_batches,
    verify_shards,
)
from tools import shard_data, train_tokenizer

WORDS = "the of and to in is for on with as by at from train model token data alpha beta gamma delta".split()
SEQ_LEN = 32


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("loader")
    rng = np.random.default_rng(0)
    # lengths from a few tokens to several rows, so documents both share rows and span them
    docs = [f"doc {i} " + " ".join(rng.choice(WORDS, size=int(rng.integers(3, 90)))) for i in range(120)]
    corpus = root / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    tok = root / "tok"
    assert train_tokenizer.main(["--input", str(corpus), "--vocab-size", "260", "--output", str(tok)]) == 0
    shards = root / "shards"
    assert shard_data.main(["--input", str(corpus), "--tokenizer", str(tok), "--output", str(shards), "--workers",
                            "1", "--quiet", "--no-clean", "--shard-mb", "0.003", "--val-fraction", "0.2"]) == 0
    return tok, shards


def split_documents(shards: Path, split: str) -> list[tuple[int, ...]]:
    from array_record.python.array_record_module import ArrayRecordReader

    manifest = load_manifest(shards)
    docs = []
    for entry in manifest["splits"][split]["shards"]:
        reader = ArrayRecordReader(str(shards / entry["file"]))
        docs.extend(tuple(np.frombuffer(r, manifest["token_dtype"]).tolist()) for r in reader.read_all())
        reader.close()
    return docs


def rows_of(batch: dict) -> np.ndarray:
    """The packed rows (seq_len + 1 tokens) a training batch was cut from."""
    return np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)


def documents_in_stream(tokens: np.ndarray, eos: int) -> list[tuple[int, ...]]:
    ends = np.flatnonzero(tokens == eos)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tuple(tokens[s : e + 1].tolist()) for s, e in zip(starts, ends, strict=True)]


def check_packing(batches: list[dict], eos: int) -> np.ndarray:
    """Check segment ids, positions and loss mask against the token stream; return the stream.

    Positions count from 0 at each document start and at each row start (a row is a model input
    of its own), so they are always < SEQ_LEN.
    """
    stream = np.concatenate([rows_of(b).reshape(-1) for b in batches])
    row_len = SEQ_LEN + 1
    rows = 0
    for b in batches:
        for r in range(len(b["inputs"])):
            row = stream[(rows + r) * row_len : (rows + r + 1) * row_len]
            starts = np.concatenate([[True], row[:-1] == eos])
            expected_pos = np.arange(row_len) - np.maximum.accumulate(np.where(starts, np.arange(row_len), 0))
            seg, pos, mask = b["segment_ids"][r], b["positions"][r], b["loss_mask"][r]
            assert np.array_equal(seg, np.cumsum(starts[:-1]))  # a segment per document part, from 1 in each row
            assert np.array_equal(pos, expected_pos[:-1]) and pos.max() < SEQ_LEN
            assert np.array_equal(mask, (seg == np.concatenate([seg[1:], [seg[-1] + (expected_pos[-1] == 0)]]))
                                  .astype(np.float32))
        rows += len(b["inputs"])
    return stream


def test_packing_loses_no_token_and_labels_segments_and_positions(dirs):
    _, shards = dirs
    manifest = load_manifest(shards)
    train = split_documents(shards, "train")
    n_tokens = manifest["splits"]["train"]["tokens"]
    it = ShardedTrainIterator(shards, SEQ_LEN, 4, seed=3, prefetch=2)
    n_batches = n_tokens // (4 * (SEQ_LEN + 1)) + 2  # a little more than one epoch
    batches = [next(it) for _ in range(n_batches)]
    assert all(b["inputs"].shape == (4, SEQ_LEN) and b["inputs"].dtype == np.int32 for b in batches)
    assert all(b["loss_mask"].dtype == np.float32 for b in batches)
    stream = check_packing(batches, manifest["eos_id"])
    first_epoch = documents_in_stream(stream, manifest["eos_id"])[: len(train)]
    assert sorted(first_epoch) == sorted(train)  # every document once: no token lost, none repeated
    assert first_epoch != train  # and shuffled
    assert sum(len(d) for d in first_epoch) == n_tokens
    assert it.epoch == 1
    it.close()


def test_data_slices_read_disjoint_parts_that_together_are_complete_and_same_slices_agree(dirs):
    _, shards = dirs
    manifest = load_manifest(shards)
    train = split_documents(shards, "train")
    n, count = len(train), 4
    seen = []
    for index in range(count):
        it = ShardedTrainIterator(shards, SEQ_LEN, 8, seed=5, data_index=index, data_count=count)
        # a host that holds the same rows of the global batch (tensor axis across hosts) reads identical batches
        twin = ShardedTrainIterator(shards, SEQ_LEN, 8, seed=5, data_index=index, data_count=count, prefetch=0)
        share = len(range(index, n, count))  # this slice's documents of the first epoch
        batches = []
        while it.get_state()["doc"] <= share:
            batches.append(next(it))
            for key, value in next(twin).items():
                np.testing.assert_array_equal(value, batches[-1][key], err_msg=f"slice {index}, {key}")
        assert batches[0]["inputs"].shape == (2, SEQ_LEN)
        stream = check_packing(batches, manifest["eos_id"])
        seen.append(documents_in_stream(stream, manifest["eos_id"])[:share])
        it.close()
        twin.close()
    together = [d for part in seen for d in part]
    assert sorted(together) == sorted(train)  # complete, and (with unique documents) disjoint
    assert len(set(together)) == len(train) == len(together)
    with pytest.raises(ConfigError, match="not divisible by the 3 data slices"):
        ShardedTrainIterator(shards, SEQ_LEN, 8, seed=5, data_index=0, data_count=3)


def test_restoring_the_state_gives_identical_next_batches(dirs):
    _, shards = dirs
    it = ShardedTrainIterator(shards, SEQ_LEN, 4, seed=7, prefetch=3)
    states, batches = [], []
    for _ in range(60):  # past one epoch, so a state inside the second epoch is restored too
        states.append(json.loads(json.dumps(it.get_state())))  # what a checkpoint stores
        batches.append(next(it))
    assert any(s["offset"] > 0 for s in states)  # states that fall inside a document are covered
    fresh = ShardedTrainIterator(shards, SEQ_LEN, 4, seed=7, prefetch=3)
    for start in (37, 0, 13, 59):
        fresh.set_state(states[start])
        for k in range(start, min(start + 8, 60)):
            got = next(fresh)
            for key in got:
                np.testing.assert_array_equal(got[key], batches[k][key], err_msg=f"resume at {start}, batch {k}")
    other_seed = ShardedTrainIterator(shards, SEQ_LEN, 4, seed=8, prefetch=0)
    assert not np.array_equal(next(other_seed)["inputs"], batches[0]["inputs"])
    with pytest.raises(ValueError, match="data_count"):
        ShardedTrainIterator(shards, SEQ_LEN, 4, seed=7, data_count=2).set_state(states[3])
    for i in (it, fresh, other_seed):
        i.close()


def test_epochs_are_counted_and_reshuffled(dirs):
    _, shards = dirs
    n = load_manifest(shards)["splits"]["train"]["documents"]
    it = ShardedTrainIterator(shards, SEQ_LEN, 2, seed=1, prefetch=0)
    assert it.epoch == 0
    orders = []
    while it.epoch < 2:
        orders.append(rows_of(next(it)))
    assert it.get_state()["doc"] >= 2 * n
    stream = np.concatenate([o.reshape(-1) for o in orders])
    eos = load_manifest(shards)["eos_id"]
    docs = documents_in_stream(stream, eos)
    assert sorted(docs[:n]) == sorted(docs[n : 2 * n]) and docs[:n] != docs[n : 2 * n]


def test_eval_batches_are_deterministic_and_split_over_data_slices(dirs):
    _, shards = dirs
    manifest = load_manifest(shards)
    val = split_documents(shards, "validation")
    whole = list(shard_eval_batches(shards, SEQ_LEN, 4))
    assert whole and all(b["inputs"].shape == (4, SEQ_LEN) for b in whole)
    for key in whole[0]:
        assert all(np.array_equal(a[key], b[key]) for a, b in zip(whole, shard_eval_batches(shards, SEQ_LEN, 4),
                                                                   strict=True))
    stream = np.concatenate([rows_of(b).reshape(-1) for b in whole])
    segments = np.concatenate([np.concatenate([b["segment_ids"], b["segment_ids"][:, -1:]], 1).reshape(-1)
                               for b in whole])
    assert documents_in_stream(stream[segments > 0], manifest["eos_id"]) == val  # in order, padding excluded
    parts = [list(shard_eval_batches(shards, SEQ_LEN, 4, data_index=p, data_count=2)) for p in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(whole)
    for k, b in enumerate(whole):
        np.testing.assert_array_equal(np.concatenate([parts[0][k]["inputs"], parts[1][k]["inputs"]]), b["inputs"])
    assert len(list(shard_eval_batches(shards, SEQ_LEN, 4, max_batches=1))) == 1


def test_compatibility_checks_name_both_directories(dirs, tmp_path):
    tok, shards = dirs
    check_compatibility(shards, tok, 260)
    with pytest.raises(ConfigError, match=f"{tok}.*model.vocab_size=256"):
        check_compatibility(shards, tok, 256)
    other = tmp_path / "other_tok"
    shutil.copytree(tok, other)
    spec = json.loads((other / "tokenizer.json").read_text())
    spec["added_tokens"][0]["content"] = "<changed>"
    (other / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match=f"{shards}.*another tokenizer.*{other}"):
        check_compatibility(shards, other, 4096)
    (other / "tokenizer.json").write_text(json.dumps(json.loads((tok / "tokenizer.json").read_text()), indent=4))
    check_compatibility(shards, other, 4096)  # formatting alone is not a different tokenizer


def test_corrupt_or_truncated_shard_is_named(dirs, tmp_path):
    _, shards = dirs
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    verify_shards(copy)
    entry = load_manifest(copy)["splits"]["train"]["shards"][1]
    path = copy / entry["file"]
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=f"shard {path}: sha256 does not match"):
        verify_shards(copy)
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ShardError, match=f"shard {path} is {len(data) // 2} bytes.*truncated"):
        verify_shards(copy)
    path.unlink()
    with pytest.raises(ShardError, match=f"shard {path} is listed in the manifest but missing"):
        ShardedTrainIterator(copy, SEQ_LEN, 4, seed=0)
    (copy / MANIFEST).unlink()
    with pytest.raises(ShardError, match="no manifest.json"):
        verify_shards(copy)


@pytest.mark.parametrize("damage", ["missing_key", "wrong_type", "missing_shard_key", "outside_file"])
def test_a_manifest_without_a_key_is_an_error_naming_the_key(dirs, tmp_path, damage):
    _, shards = dirs
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    if damage == "missing_key":
        del manifest["eos_id"]
        message = "key 'eos_id' is missing"
    elif damage == "wrong_type":
        manifest["splits"]["validation"]["documents"] = "12"
        message = "key 'splits.validation.documents' is a str, not a int"
    elif damage == "missing_shard_key":
        del manifest["splits"]["train"]["shards"][1]["sha256"]
        message = r"key 'splits.train.shards\[1\].sha256' is missing"
    else:
        manifest["splits"]["train"]["shards"][0]["file"] = "../x.array_record"
        message = r"key 'splits.train.shards\[0\].file' is '../x.array_record', not a file name inside the shard"
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=f"{copy / MANIFEST}: {message}"):
        ShardedTrainIterator(copy, SEQ_LEN, 4, seed=0)


def test_a_damaged_shard_is_named_when_read_without_verification(dirs, tmp_path, monkeypatch):
    _, shards = dirs
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    entry = load_manifest(copy)["splits"]["train"]["shards"][2]
    path = copy / entry["file"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated: array_record fails when it opens the file
    with pytest.raises(ShardError, match=f"shard {path} cannot be read.*truncated or corrupt.*verify_shards"):
        ShardedTrainIterator(copy, SEQ_LEN, 4, seed=0)
    path.write_bytes(data)

    # a block that fails its checksum only when read: the bare RuntimeError becomes an error naming the shard
    import grain

    real_getitem = grain.sources.ArrayRecordDataSource.__getitem__
    first, count = sum(e["documents"] for e in load_manifest(copy)["splits"]["train"]["shards"][:2]), entry["documents"]

    def failing_getitem(self, index):
        if first <= index < first + count:
            raise RuntimeError("Corrupted Riegeli/records file: block header hash mismatch")
        return real_getitem(self, index)

    monkeypatch.setattr(grain.sources.ArrayRecordDataSource, "__getitem__", failing_getitem)
    for prefetch in (0, 2):
        it = ShardedTrainIterator(copy, SEQ_LEN, 4, seed=0, prefetch=prefetch)
        with pytest.raises(ShardError, match=f"shard {path}: document \\d+ cannot be read.*hash mismatch"):
            for _ in range(200):
                next(it)
        it.close()
