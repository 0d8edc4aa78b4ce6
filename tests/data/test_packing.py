"""Packing and the batch check: positions restart in every row, so no loader ever yields a position
>= seq_len (first pass and after set_state, for random document lengths), resumed batches equal
uninterrupted ones, and check_batch names the source of an out-of-range position or token id."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmtrain.config import ConfigError
from lmtrain.data import shards as shards_lib
from lmtrain.data.packing import DataError, check_batch, pack_documents, rows_to_batch
from lmtrain.data.pipeline import PackedRowsIterator
from lmtrain.data.shard_writer import ShardFileWriter
from lmtrain.storage.atomic import atomic_write_json

EOS = 1
VOCAB = 500


def random_documents(rng: np.random.Generator, seq_len: int, n: int) -> list[np.ndarray]:
    """Documents from 1 token to several rows long (EOS last), so they both share rows and span them."""
    longest = int(rng.choice([2, seq_len, 6 * seq_len]))
    lengths = rng.integers(1, longest + 1, size=n)
    return [np.append(rng.integers(2, VOCAB, size=int(k) - 1), EOS) for k in lengths]


def write_shards(root: Path, train_docs: list[np.ndarray], val_docs: list[np.ndarray], docs_per_shard: int = 7) -> Path:
    """A shard directory as tools/shard_data.py writes it, made directly from token arrays."""
    root.mkdir(parents=True, exist_ok=True)
    dtype = shards_lib.token_dtype(VOCAB)
    splits = {}
    for split, docs in (("train", train_docs), ("validation", val_docs)):
        entries = []
        for k in range(0, len(docs), docs_per_shard):
            writer = ShardFileWriter(root / f"{split}-{len(entries):05d}.array_record", dtype)
            for doc in docs[k : k + docs_per_shard]:
                writer.write(doc)
            entries.append(writer.finish())
        splits[split] = {"documents": len(docs), "tokens": int(sum(len(d) for d in docs)), "shards": entries}
    manifest = {"format": shards_lib.FORMAT, "token_dtype": dtype.name, "vocab_size": VOCAB, "eos_id": EOS,
                "tokenizer": {"dir": "none", "fingerprint": "0" * 64}, "fingerprint": {}, "splits": splits}
    atomic_write_json(root / shards_lib.MANIFEST, manifest)
    return root


def assert_positions_restart_per_row(batch: dict, seq_len: int, where: str) -> None:
    """Every segment of a row has positions 0..n-1, so every position is < seq_len."""
    seg, pos = batch["segment_ids"], batch["positions"]
    assert pos.shape[1] == seq_len and 0 <= pos.min() and pos.max() < seq_len, f"{where}: positions {pos.max()}"
    for r in range(len(seg)):
        for s in np.unique(seg[r][seg[r] > 0]):
            np.testing.assert_array_equal(pos[r][seg[r] == s], np.arange(np.sum(seg[r] == s)), err_msg=where)
    check_batch(batch, VOCAB, seq_len, where)


def assert_same_batch(a: dict, b: dict, where: str) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=f"{where}: {key}")


@pytest.mark.parametrize("trial", range(6))
def test_no_loader_yields_a_position_past_seq_len_and_resume_is_exact(trial, tmp_path):
    # A seeded random search (over document lengths, seq_len, batch size and resume points) rather
    # than hypothesis: each trial runs Grain loaders, and a fixed seed keeps CI deterministic.
    rng = np.random.default_rng(1000 + trial)
    seq_len = int(rng.choice([4, 8, 16, 33]))
    batch = int(rng.choice([1, 2, 4]))
    docs = random_documents(rng, seq_len, int(rng.integers(20, 60)))
    n_batches = 25

    # the built-in in-memory loader: rows packed once, served in shuffled batches
    rows = pack_documents(docs, seq_len)
    assert rows["positions"].max() <= seq_len  # rows hold seq_len + 1 tokens; the last is only a target
    if len(rows["tokens"]) >= batch:
        it = PackedRowsIterator(rows, batch, trial, data_index=0, data_count=1)
        states, batches = [], []
        for k in range(n_batches):
            states.append(it.get_state())
            batches.append(next(it))
            assert_positions_restart_per_row(batches[-1], seq_len, f"builtin trial {trial} batch {k}")
        for start in rng.integers(0, n_batches, size=3):
            resumed = PackedRowsIterator(rows, batch, trial, data_index=0, data_count=1)
            resumed.set_state(json.loads(json.dumps(states[start])))
            for k in range(start, n_batches):
                assert_same_batch(next(resumed), batches[k], f"builtin resume at {start}, batch {k}")

    # the Grain shard loader: documents streamed and packed lazily, resumed mid-document
    shard_dir = write_shards(tmp_path / "shards", docs, docs[:3])
    it = shards_lib.ShardedTrainIterator(shard_dir, seq_len, batch, seed=trial, prefetch=0)
    states, batches = [], []
    for k in range(n_batches):
        states.append(json.loads(json.dumps(it.get_state())))
        batches.append(next(it))
        assert_positions_restart_per_row(batches[-1], seq_len, f"shards trial {trial} batch {k}")
    it.close()
    mid_document = [k for k, s in enumerate(states) if s["offset"] > 0]
    starts = list(rng.choice(mid_document, size=min(2, len(mid_document)), replace=False)) if mid_document else []
    for start in [*starts, int(rng.integers(0, n_batches))]:
        resumed = shards_lib.ShardedTrainIterator(shard_dir, seq_len, batch, seed=trial, prefetch=2)
        resumed.set_state(states[start])
        for k in range(start, n_batches):
            got = next(resumed)
            assert_positions_restart_per_row(got, seq_len, f"shards resumed at {start}, batch {k}")
            assert_same_batch(got, batches[k], f"shards resume at {start}, batch {k}")
        resumed.close()
    for k, b in enumerate(shards_lib.shard_eval_batches(shard_dir, seq_len, batch)):
        assert_positions_restart_per_row(b, seq_len, f"shards eval batch {k}")


def test_a_document_spanning_rows_restarts_its_positions_in_each_row():
    doc = np.arange(2, 2 + 10)  # 10 tokens over rows of 4: 4 + 4 + 2
    rows = pack_documents([np.array([7, 8]), doc], seq_len=3, keep_partial=True)
    np.testing.assert_array_equal(rows["tokens"], [[7, 8, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]])
    np.testing.assert_array_equal(rows["segment_ids"], [[1, 1, 2, 2], [1, 1, 1, 1], [1, 1, 1, 1]])
    np.testing.assert_array_equal(rows["positions"], [[0, 1, 0, 1], [0, 1, 2, 3], [0, 1, 2, 3]])
    batch = rows_to_batch(rows["tokens"], rows["segment_ids"], rows["positions"])
    np.testing.assert_array_equal(batch["loss_mask"], [[1, 0, 1], [1, 1, 1], [1, 1, 1]])


def test_check_batch_names_the_source_and_the_bad_value():
    rows = pack_documents([np.arange(2, 47)], seq_len=8)  # 5 full rows, largest id 46
    batch = rows_to_batch(rows["tokens"], rows["segment_ids"], rows["positions"])
    check_batch(batch, vocab_size=47, max_seq_len=8, source="shards/x")
    assert issubclass(DataError, ConfigError)
    with pytest.raises(DataError, match=r"shards/x: a batch holds position 7, outside \[0, 7\)"):
        check_batch(batch, vocab_size=47, max_seq_len=7, source="shards/x")
    with pytest.raises(DataError, match=r"data.source=builtin: a batch holds token id 46 in 'targets'.*\[0, 46\)"):
        check_batch(batch, vocab_size=46, max_seq_len=8, source="data.source=builtin")
    bad = dict(batch, inputs=batch["inputs"] - 3)
    with pytest.raises(DataError, match="token id -1 in 'inputs'"):
        check_batch(bad, vocab_size=47, max_seq_len=8, source="s")
    bad = dict(batch, positions=batch["positions"] - 1)
    with pytest.raises(DataError, match="position -1"):
        check_batch(bad, vocab_size=47, max_seq_len=8, source="s")


def test_builtin_data_slices_same_index_identical_different_disjoint_and_complete():
    rng = np.random.default_rng(0)
    rows = pack_documents(random_documents(rng, 8, 80), seq_len=8)
    whole = PackedRowsIterator(rows, 8, seed=3, data_index=0, data_count=1)
    for count in (2, 4):
        slices = [PackedRowsIterator(rows, 8, seed=3, data_index=i, data_count=count) for i in range(count)]
        twins = [PackedRowsIterator(rows, 8, seed=3, data_index=i, data_count=count) for i in range(count)]
        whole.set_state({**whole.get_state(), "step": 0})
        for step in range(2 * whole.batches_per_epoch + 1):  # across an epoch boundary (reshuffle)
            parts = [next(s) for s in slices]
            for i, twin in enumerate(twins):
                assert_same_batch(next(twin), parts[i], f"slice {i} of {count}, step {step}")
            # the slices, in order, are the global batch: disjoint rows that together are complete
            assert_same_batch({k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, next(whole),
                              f"{count} slices, step {step}")
    with pytest.raises(ConfigError, match="data slice 2 of 2 does not exist"):
        PackedRowsIterator(rows, 8, seed=3, data_index=2, data_count=2)
    with pytest.raises(ConfigError, match="data.batch_size=8 is not divisible by the 3 data slices"):
        PackedRowsIterator(rows, 8, seed=3, data_index=0, data_count=3)
