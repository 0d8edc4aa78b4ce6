"""The data-format registry (issue 18): a format defined outside lmtrain shards and loads through the public
registry, and every built-in format stores, decodes and batches an example exactly as before the registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from lmtrain import plugins
from lmtrain.config import ConfigError
from lmtrain.data.builtin_corpus import builtin_documents
from lmtrain.data.formats import FORMATS, get_format
from lmtrain.data.packing import ExamplePacker, RowPacker, classify_batch, rows_dict_to_batch
from lmtrain.data.pipeline import make_data
from lmtrain.data.shard_files import FORMAT, MANIFEST, ShardError
from lmtrain.data.shard_writer import ShardFileWriter
from lmtrain.data.shards import ShardedTrainIterator, decode_record, load_manifest, shard_eval_batches
from lmtrain.data.tokenizer import train_bpe_tokenizer
from lmtrain.storage.atomic import atomic_write_json
from tests.core_fixtures import cli_env
from tests.helpers import small_config

REPO = Path(__file__).resolve().parents[2]
PLUGIN = "lmtrain_toy_scored_format"
SEQ_LEN = 32

# A text format with a per-example scalar, one example per row: what a reward or preference format adds.
PLUGIN_SOURCE = '''
import collections

import numpy as np

from lmtrain.data.examples import ExampleError
from lmtrain.data.formats import ExampleFormat, register_format
from lmtrain.config import ConfigError
from lmtrain.data.packing import classify_batch


class ScoredEncoder:
    def __init__(self, tokenizer, seq_len):
        self.tokenizer, self.seq_len, self.counts = tokenizer, seq_len, collections.Counter()

    def validate(self, record, where):
        if not isinstance(record.get("score"), (int, float)):
            raise ExampleError(f"{where}: no numeric field 'score'.")

    def encode(self, record, where):
        ids = self.tokenizer.encode(record["text"], add_special_tokens=False).ids[: self.seq_len]
        return {"tokens": np.asarray(ids, np.int64), "score": float(record["score"])}


class ScoredText(ExampleFormat):
    name = "scored_text"
    packing = "row"
    example_fields = (("score", "<f4"),)
    key_field = "text_field"
    records = "text and score fields"

    def make_encoder(self, tokenizer, args):
        return ScoredEncoder(tokenizer.backend, args.seq_len)

    def arrays(self, example, label_ids):
        return example

    def batch(self, examples, row_len, batch_rows, pad_id):
        batch = classify_batch([(ex["tokens"], 0) for ex in examples], row_len, batch_rows, pad_id)
        score_B = np.zeros(batch_rows, np.float32)
        score_B[: len(examples)] = [ex["score"] for ex in examples]
        return {**batch, "score": score_B}


register_format(ScoredText())
'''


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("formats") / "tokenizer"
    train_bpe_tokenizer(builtin_documents(40), 512, out)
    return str(out)


@pytest.fixture
def toy_plugin(tmp_path, monkeypatch):
    """The plugin module in a directory of its own, named in LMTRAIN_PLUGINS; unregistered afterwards."""
    plugin_dir = tmp_path / "plugin"
    plugin_dir.mkdir()
    (plugin_dir / f"{PLUGIN}.py").write_text(PLUGIN_SOURCE)
    monkeypatch.syspath_prepend(str(plugin_dir))
    monkeypatch.setenv(plugins.ENV_VAR, PLUGIN)
    yield plugin_dir
    FORMATS.pop("scored_text", None)
    sys.modules.pop(PLUGIN, None)
    plugins._loaded.discard(PLUGIN)


def run_shard_data(args: list[str], pythonpath: list[str], plugin: str | None):
    env = {**cli_env(), "PYTHONPATH": os.pathsep.join([*pythonpath, str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop(plugins.ENV_VAR, None)
    if plugin:
        env[plugins.ENV_VAR] = plugin
    return subprocess.run([sys.executable, "tools/shard_data.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def test_a_plugin_format_is_sharded_by_the_tool_and_read_back_by_the_loader(toy_plugin, tmp_path, tokenizer_dir):
    records = [{"text": f"record number {k} says " + "hello " * (k % 4), "score": k + 0.5} for k in range(24)]
    data = tmp_path / "scored.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "shards"
    args = ["--input", str(data), "--format", "scored_text", "--tokenizer", tokenizer_dir, "--output", str(out),
            "--seq-len", str(SEQ_LEN), "--val-fraction", "0.25", "--workers", "1", "--quiet"]

    unknown = run_shard_data(args, [], plugin=None)  # without the plugin the format is not a choice
    assert unknown.returncode == 2 and "invalid choice: 'scored_text'" in unknown.stderr, unknown.stderr
    done = run_shard_data(args, [str(toy_plugin)], plugin=PLUGIN)
    assert done.returncode == 0, done.stderr
    assert "scored_text examples: 24 read, 24 kept" in done.stdout

    plugins.load_plugins()  # this process reads the shards with the same plugin
    manifest = load_manifest(out)
    assert manifest["example_format"] == "scored_text" and "labels" not in manifest
    assert "target_tokens" not in manifest["splits"]["train"]  # the format counts no trained-on tokens
    tok = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    score_of = {r["text"].strip(): r["score"] for r in records}

    def scores_by_text(batch) -> dict[str, float]:
        rows = np.flatnonzero(batch["weights"])
        return {tok.decode(batch["inputs"][r][batch["segment_ids"][r] > 0].tolist()).strip(): float(batch["score"][r])
                for r in rows}

    n_train = manifest["splits"]["train"]["documents"]
    train = ShardedTrainIterator(out, SEQ_LEN, 1, seed=3, prefetch=0)
    seen_train: dict[str, float] = {}
    for _ in range(n_train):  # one epoch: every training example once
        seen_train.update(scores_by_text(next(train)))
    train.close()
    seen_val: dict[str, float] = {}
    for batch in shard_eval_batches(out, SEQ_LEN, 2):
        seen_val.update(scores_by_text(batch))
    assert len(seen_train) == n_train and len(seen_val) == manifest["splits"]["validation"]["documents"] > 0
    assert not set(seen_train) & set(seen_val)
    assert {**seen_train, **seen_val} == score_of  # every example, with the score written for its text

    FORMATS.pop("scored_text")  # a reader without the plugin is told what to load
    with pytest.raises(ShardError, match="'example_format' is 'scored_text'.*LMTRAIN_PLUGINS"):
        load_manifest(out)


# Per built-in format: two stored examples, their bytes as the shard files held them before the registry
# (little-endian; the tokens uint16), and the batch the loader made of them.
TOKENS = (np.array([5, 6, 7, 2]), np.array([8, 9, 2]))
BUILTIN = {
    "text": ([{"tokens": TOKENS[0]}, {"tokens": TOKENS[1]}],
             [t.astype("<u2").tobytes() for t in TOKENS]),
    "sft": ([{"tokens": TOKENS[0], "weights": np.array([0, 0, 1, 1])}, {"tokens": TOKENS[1], "weights": np.array([0, 1, 1])}],
            [TOKENS[0].astype("<u2").tobytes() + bytes([0, 0, 1, 1]), TOKENS[1].astype("<u2").tobytes() + bytes([0, 1, 1])]),
    "chat": ([{"tokens": TOKENS[0], "weights": np.array([1, 0, 1, 1])}, {"tokens": TOKENS[1], "weights": np.array([0, 0, 1])}],
             [TOKENS[0].astype("<u2").tobytes() + bytes([1, 0, 1, 1]), TOKENS[1].astype("<u2").tobytes() + bytes([0, 0, 1])]),
    "classify": ([{"tokens": TOKENS[0], "label": 1}, {"tokens": TOKENS[1], "label": 0}],
                 [np.int32(1).astype("<i4").tobytes() + TOKENS[0].astype("<u2").tobytes(),
                  np.int32(0).astype("<i4").tobytes() + TOKENS[1].astype("<u2").tobytes()]),
    "ner": ([{"tokens": TOKENS[0], "token_labels": np.array([-1, 1, 0, -1])},
             {"tokens": TOKENS[1], "token_labels": np.array([-1, 1, -1])}],
            [TOKENS[0].astype("<u2").tobytes() + np.array([-1, 1, 0, -1], "<i2").tobytes(),
             TOKENS[1].astype("<u2").tobytes() + np.array([-1, 1, -1], "<i2").tobytes()]),
}
BUILTIN_SEQ_LEN = 8


def expected_batch(name: str, stored: list[dict]) -> dict:
    """The batch of the two examples as the loader made it before the registry, from packing's primitives."""
    tokens = [s["tokens"] for s in stored]
    if name == "text":
        packer = RowPacker(BUILTIN_SEQ_LEN + 1)
        rows = [r for t in tokens for r in packer.add(t)] + packer.finish()
        return rows_dict_to_batch(rows + [{k: np.zeros_like(v) for k, v in rows[0].items()}] * (2 - len(rows)))
    if name in ("sft", "chat"):
        packer = ExamplePacker(BUILTIN_SEQ_LEN + 1)
        rows = [r for s in stored for r in packer.add(s["tokens"], s["weights"])] + packer.finish()
        return rows_dict_to_batch(rows + [{k: np.zeros_like(v) for k, v in rows[0].items()}] * (2 - len(rows)))
    if name == "classify":
        return classify_batch([(s["tokens"], s["label"]) for s in stored], BUILTIN_SEQ_LEN, 2)
    batch = classify_batch([(t, 0) for t in tokens], BUILTIN_SEQ_LEN, 2)
    labels_BxL, weights_BxL = np.zeros((2, BUILTIN_SEQ_LEN), np.int32), np.zeros((2, BUILTIN_SEQ_LEN), np.float32)
    for r, s in enumerate(stored):
        labels_BxL[r, : len(s["tokens"])] = np.maximum(s["token_labels"], 0)
        weights_BxL[r, : len(s["tokens"])] = s["token_labels"] >= 0
    return {**batch, "labels": labels_BxL, "weights": weights_BxL}


@pytest.mark.parametrize("name", list(BUILTIN))
def test_every_builtin_format_round_trips_an_example_as_before(name, tmp_path):
    fmt = get_format(name)
    stored, layout = BUILTIN[name]
    writer = ShardFileWriter(tmp_path / "train-00000.array_record", np.uint16, example_format=fmt)
    for example in stored:
        writer.write(**example)
    entry = writer.finish()
    assert [fmt.encode(s, np.uint16) for s in stored] == layout  # the bytes on disk are unchanged
    for example, record in zip(stored, layout, strict=True):
        decoded = fmt.decode(record, np.uint16)
        assert set(decoded) == set(example)
        for key, value in example.items():
            np.testing.assert_array_equal(decoded[key], value)
        tokens, per_token, per_example = decode_record(name, np.uint16, record)  # lmtrain eval's view
        np.testing.assert_array_equal(tokens, example["tokens"])
        assert (per_token is None) == (not fmt.token_fields) and (per_example == -1) == (not fmt.example_fields)
        if fmt.token_fields:
            np.testing.assert_array_equal(per_token, example[fmt.token_fields[0][0]])
        if fmt.example_fields:
            assert per_example == example[fmt.example_fields[0][0]]
    manifest = {"format": FORMAT, "example_format": name, "seq_len": BUILTIN_SEQ_LEN, "token_dtype": "uint16",
                "vocab_size": 16, "eos_id": 2, "tokenizer": {"dir": "none", "fingerprint": "0" * 64}, "splits": {
                    "train": {"documents": 2, "tokens": 7, "shards": [entry]},
                    "validation": {"documents": 2, "tokens": 7, "shards": [entry]}}}
    if fmt.label_vocab:
        manifest["labels"] = ["a", "b"]
    atomic_write_json(tmp_path / MANIFEST, manifest)
    (batch,) = list(shard_eval_batches(tmp_path, BUILTIN_SEQ_LEN, 2))
    want = expected_batch(name, stored)
    assert sorted(batch) == sorted(want)
    for key in want:
        np.testing.assert_array_equal(batch[key], want[key], err_msg=key)


def test_make_data_refuses_examples_in_a_format_the_task_does_not_read(tmp_path):
    cfg = small_config(**{"task.name": "toy", "data.source": "builtin"})
    with pytest.raises(ConfigError, match="task.name=toy needs shards made with tools/shard_data.py --format sft or "
                                          "chat, but data.source=builtin is plain text"):
        make_data(cfg, tmp_path, formats=("sft", "chat"))
    assert not (tmp_path / "tokenizer").exists()  # refused before any work
