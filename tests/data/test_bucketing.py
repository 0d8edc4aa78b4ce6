"""Length bucketing for the one-example-per-row tasks (data.length_buckets, issue 25): rows only as long as
the batch needs, from a bounded set of lengths, in a deterministic order that resumes exactly and that does
not depend on how many data slices share the batch."""

import json

import jax
import numpy as np
import pytest

from lmtrain.data.packing import DataError
from lmtrain.data.shards import BUCKET_WINDOW_BATCHES, ShardedTrainIterator, bucket_length, shard_eval_batches
from lmtrain.train.trainer import train
from lmtrain.workdir import restore_params
from tests.helpers import small_config

SEQ_LEN = 128  # the demo's texts are mostly far shorter: unbucketed, about half of every row is padding


@pytest.fixture(scope="module")
def short_texts(builtin_shards, tmp_path_factory):
    """The built-in classification demo, cut for 128 tokens: (tokenizer, shards)."""
    from tools import shard_data

    tok, _ = builtin_shards
    out = tmp_path_factory.mktemp("bucketing") / "classify"
    assert shard_data.main(["--builtin-task", "classify", "--tokenizer", tok, "--output", str(out),
                            "--seq-len", str(SEQ_LEN), "--quiet"]) == 0
    return tok, str(out)


def _batches(shards, n, length_buckets=16, batch=8, **kw):
    it = ShardedTrainIterator(shards, SEQ_LEN, batch, seed=3, prefetch=0, length_buckets=length_buckets, **kw)
    return [next(it) for _ in range(n)]


def _padding(batches) -> float:
    real = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
    return 1 - real / sum(b["segment_ids"].size for b in batches)


def _examples(batches) -> list:
    """Each real row as (label, its tokens), sorted: the examples a list of batches holds, in any order."""
    return sorted((int(b["labels"][r]), tuple(b["inputs"][r][b["segment_ids"][r] > 0]))
                  for b in batches for r in range(len(b["labels"])))


def test_bucketed_rows_are_mostly_real_tokens_from_a_few_lengths(short_texts):
    _, shards = short_texts
    bucketed, padded = _batches(shards, BUCKET_WINDOW_BATCHES), _batches(shards, BUCKET_WINDOW_BATCHES, 0)
    assert _padding(padded) > 0.3  # the data is short: padding every row to seq_len wastes a third or more
    assert _padding(bucketed) < 0.15
    lengths = {b["inputs"].shape[1] for b in bucketed}
    assert 3 <= len(lengths) <= 16 and max(lengths) <= SEQ_LEN
    assert lengths <= {bucket_length(n, SEQ_LEN, 16) for n in range(1, SEQ_LEN + 1)}
    for b in bucketed:  # every row fits its bucket whole, and the bucket is the smallest that holds the longest
        longest = int((b["segment_ids"] > 0).sum(1).max())
        assert b["inputs"].shape[1] == bucket_length(longest, SEQ_LEN, 16)
    # A window holds the same examples as the unbucketed stream's, only grouped by length.
    assert _examples(bucketed) == _examples(padded)


def test_bucketed_order_resumes_exactly_and_data_slices_make_up_the_global_batch(short_texts):
    _, shards = short_texts
    it = ShardedTrainIterator(shards, SEQ_LEN, 8, seed=3, prefetch=2, length_buckets=16)
    states, batches = [], []
    for _ in range(BUCKET_WINDOW_BATCHES + 3):  # into the second window
        states.append(it.get_state())
        batches.append(next(it))
    for k in (1, BUCKET_WINDOW_BATCHES - 1, BUCKET_WINDOW_BATCHES + 1):
        fresh = ShardedTrainIterator(shards, SEQ_LEN, 8, seed=3, prefetch=0, length_buckets=16)
        fresh.set_state(states[k])
        for expected in batches[k:k + 2]:
            got = next(fresh)
            assert got.keys() == expected.keys()
            for key in got:
                np.testing.assert_array_equal(got[key], expected[key])
    halves = [_batches(shards, 4, data_index=i, data_count=2) for i in (0, 1)]
    for whole, first, second in zip(batches[:4], *halves):
        for key in whole:
            np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), whole[key])
    unbucketed = ShardedTrainIterator(shards, SEQ_LEN, 8, seed=3, prefetch=0)
    next(unbucketed)
    with pytest.raises(DataError, match="length_buckets"):
        ShardedTrainIterator(shards, SEQ_LEN, 8, seed=3, prefetch=0, length_buckets=16).set_state(
            unbucketed.get_state())


def test_bucketed_eval_batches_score_the_same_examples_in_shorter_rows(short_texts):
    _, shards = short_texts
    bucketed = list(shard_eval_batches(shards, SEQ_LEN, 8, length_buckets=16))
    padded = list(shard_eval_batches(shards, SEQ_LEN, 8))
    assert len(bucketed) == len(padded) and _padding(bucketed) < _padding(padded)
    for b, p in zip(bucketed, padded):
        np.testing.assert_array_equal(b["labels"], p["labels"])
        np.testing.assert_array_equal(b["inputs"], p["inputs"][:, :b["inputs"].shape[1]])


def _cfg(tok, shards, **kw):
    values = {"task.name": "classify", "data.source": "shards", "data.tokenizer_dir": tok, "data.shards_dir": shards,
              "model.vocab_size": 1024, "data.seq_len": SEQ_LEN, "model.max_seq_len": SEQ_LEN, "train.steps": 6,
              "train.eval_every": 0, "checkpoint.every": 3, "optimizer.lr": 3e-3, "train.log_every": 1}
    values.update(kw)
    return small_config("llama", **values)


def _flat_params(workdir) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(restore_params(workdir)[1])[0]}


def _losses(workdir) -> list[float]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


@pytest.mark.heavy  # ~60 s: four short runs, each compiling a step per row length
@pytest.mark.multidevice
def test_bucketed_classify_resumes_exactly_and_sharded_equals_unsharded(short_texts, tmp_path):
    """Rows of several lengths go through the trainer's jitted step (one program per length) on the 8 fake
    devices: a run stopped and resumed ends bit-identical, and a (2, 2, 2) mesh trains as data parallelism does."""
    tok, shards = short_texts
    kw = {"data.length_buckets": 4, "train.steps": 4, "checkpoint.every": 2}  # at most 4 programs per run
    data_parallel = {"mesh.data": -1, "mesh.fsdp": 1, "mesh.tensor": 1}  # every parameter whole on each device
    assert train(_cfg(tok, shards, **kw, **data_parallel), tmp_path / "straight").step == 4
    train(_cfg(tok, shards, **kw, **data_parallel), tmp_path / "resumed", stop_at_step=2)
    train(_cfg(tok, shards, **kw, **data_parallel), tmp_path / "resumed")
    reference = _flat_params(tmp_path / "straight")
    resumed = _flat_params(tmp_path / "resumed")
    assert resumed.keys() == reference.keys()
    for key, value in resumed.items():
        np.testing.assert_array_equal(value, reference[key], err_msg=f"{key} after a resume")
    train(_cfg(tok, shards, **kw, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}), tmp_path / "sharded")
    # Losses, not parameters: Adam turns rounding in near-zero gradients into visibly different updates.
    logged = [r for r in map(json.loads, (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    assert all(0 < r["tokens_per_s"] < r["slots_per_s"] and 0.5 < r["real_fraction"] < 1 for r in logged)
    reference_losses = _losses(tmp_path / "straight")
    assert len(reference_losses) == 4 and np.all(np.isfinite(reference_losses))
    np.testing.assert_allclose(_losses(tmp_path / "sharded"), reference_losses, rtol=1e-5)
