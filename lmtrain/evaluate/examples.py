"""What `lmtrain eval` scores: an eval set read from a shard directory (any example format) or from raw files
through the data toolchain's readers, and its encoding for one model.

An eval set is model-independent; `encode` turns it into what one model scores:
- lm: documents, each as the tokenizer encodes a model input (with a BOS where the tokenizer adds one, as
  Llama's do) and scored as training scores it: every token but the first is predicted from what precedes it
  in its document; a document longer than the model's window is scored in consecutive windows, each taking
  the previous window's last token as context. Bits per byte divide the summed loss by the UTF-8 bytes of the
  text the predicted tokens cover (the whole document when a BOS leads it, else all but its first token).
- sft: examples as training saw them (the loss mask on the completion and its EOS) for perplexity; for
  generation the prompt is the unmasked prefix of each example and the reference is its first masked run
  (the completion, or the first assistant turn), decoded with the EOS stripped.
- classify: each text's tokens and its class id in the model's class list.

Shards hold token ids, so a model must use the tokenizer they were made with (checked by fingerprint); raw
files are tokenized by each model with its own tokenizer, which is what makes bits per byte comparable
across tokenizers.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from lmtrain.data import shards
from lmtrain.data.examples import ClassifyEncoder, ExampleError, SftEncoder
from lmtrain.data.packing import DataError
from lmtrain.data.pipeline import check_labels
from lmtrain.data.shards import MANIFEST
from lmtrain.data.tokenizer import eos_id
from lmtrain.evaluate.metrics import EvalError
from lmtrain.paths import as_path, is_remote
from lmtrain.prep.text_sources import CorpusSpec, SourceError, expand_files, iter_documents, iter_records
from lmtrain.tasks.generation_eval import split_sft_example

KINDS = {"text": "lm", "sft": "sft", "chat": "sft", "classify": "classify"}  # example format -> metrics task
RAW_FORMATS = ("text", "sft", "classify")


@dataclasses.dataclass
class EvalSet:
    kind: str  # the metrics registry's task: 'lm', 'sft' or 'classify'
    source: str  # the data as the user named it
    split: str = ""  # shards: the split read; raw files: ''
    shards_dir: str = ""  # shards: examples are stored token ids
    stored: list = dataclasses.field(default_factory=list)  # shards: (tokens, mask or None, label id) per example
    raw: list = dataclasses.field(default_factory=list)  # raw files: (record, where) per example
    labels: list | None = None  # classify shards: the classes in class-id order
    label_counts: list | None = None  # classify shards: examples per class in the training split
    eos_id: int | None = None  # shards: the EOS the toolchain appended
    fields: dict = dataclasses.field(default_factory=dict)  # raw files: text/prompt/completion/label field names

    def __len__(self) -> int:
        return len(self.stored) if self.shards_dir else len(self.raw)

    def describe(self) -> str:
        return f"{self.source} ({self.split} split)" if self.split else self.source

    @property
    def has_references(self) -> bool:
        """sft: whether the examples carry their completions (shards always do; raw records may not)."""
        if self.shards_dir or self.kind != "sft":
            return True
        key = self.fields["completion"]
        return any(record.get(key) is not None for record, _ in self.raw)


@dataclasses.dataclass
class Encoded:
    """One model's view of an eval set."""

    records: list[dict]  # what the report shows per example: lm {'text'}, sft {'prompt', 'reference'}, classify {'text', 'label'}
    pieces: list[tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=list)  # (tokens, target weights)
    n_bytes: int = 0  # UTF-8 bytes of the text the pieces' targets cover
    prompts: list[np.ndarray] = dataclasses.field(default_factory=list)  # sft: generation prompts
    references: list[str] | None = None  # sft: None when the examples have no completion
    inputs: list[np.ndarray] = dataclasses.field(default_factory=list)  # classify: each text's tokens
    class_ids: list[int] = dataclasses.field(default_factory=list)  # classify: in the model's class order
    row_len: int = 0  # tokens per scoring row (seq_len + 1), or the classify sequence length


# ----------------------------------------------------------------------------- reading


def is_shard_dir(data: str) -> bool:
    if is_remote(data):
        return (as_path(data) / MANIFEST).exists()
    return os.path.isdir(data) and os.path.exists(os.path.join(data, MANIFEST))


def read_eval_set(data: str, split: str | None = None, max_examples: int = 0, raw_format: str = "text",
                  fields: dict | None = None, cv: tuple[int, int] = (0, 0)) -> EvalSet:
    """The first `max_examples` (0: all) examples of `data`: a shard directory's split (default: test when the
    shards have one, else validation; with `cv` = (folds, fold), validation is that held-out fold of the
    training split), or raw .txt/.jsonl/.parquet/.csv files or globs of them."""
    if is_shard_dir(data):
        return _read_shards(data, split, max_examples, cv)
    if split:
        raise EvalError(f"--split {split} picks a split of a shard directory; {data} is not one (no manifest.json). "
                        "Leave --split out for raw files.")
    if raw_format not in RAW_FORMATS:
        raise EvalError(f"--format {raw_format}: raw files are read as {', '.join(RAW_FORMATS)}.")

    fields = {"text": "text", "prompt": "prompt", "completion": "completion", "label": "label", **(fields or {})}
    spec = CorpusSpec(files=(data,), text_field=fields["text"], max_docs=max_examples)
    try:
        expand_files(spec.files)
        if raw_format == "text":
            raw = [({"text": doc}, "") for doc in iter_documents(spec) if doc.strip()]
        else:
            raw = list(iter_records(spec))
    except SourceError as e:
        raise EvalError(str(e)) from None
    eval_set = EvalSet(KINDS[raw_format], data, raw=raw, fields=fields)
    _check_not_empty(eval_set)
    return eval_set


def _read_shards(shards_dir: str, split: str | None, max_examples: int, cv: tuple[int, int]) -> EvalSet:
    manifest = shards.load_manifest(shards_dir)
    available = shards.manifest_splits(manifest)
    split = split or ("test" if "test" in available else "validation")
    if split not in available:
        raise EvalError(f"{shards_dir} has no '{split}' split (it has {', '.join(available)}); re-shard with "
                        "--test-fraction for a test split, or pick another with --split.")
    fmt = shards.example_format(manifest)
    stored = shards.read_examples(shards_dir, split, max_examples, manifest, *cv)
    counts = manifest["splits"]["train"].get("label_counts")
    eval_set = EvalSet(KINDS[fmt], shards_dir, split, shards_dir=shards_dir, stored=stored,
                       labels=manifest.get("labels"), label_counts=counts, eos_id=int(manifest["eos_id"]))
    _check_not_empty(eval_set)
    return eval_set


def _check_not_empty(eval_set: EvalSet) -> None:
    if not len(eval_set):
        raise EvalError(f"the eval set is empty: {eval_set.describe()} holds no examples. Give a non-empty eval set.")


# ----------------------------------------------------------------------------- encoding for one model


def encode(eval_set: EvalSet, tokenizer, tokenizer_dir, vocab_size: int, row_len: int,
           labels: list | None = None) -> Encoded:
    """The eval set as `tokenizer` (a transformers tokenizer) encodes it, in scoring rows of `row_len` tokens
    (the model's positions + 1; a classifier's sequence length); `labels` are a classifier's classes in order."""
    if eval_set.shards_dir:
        if tokenizer_dir is not None:  # None: the caller checked (the trainer does at start-up)
            shards.check_compatibility(eval_set.shards_dir, tokenizer_dir, vocab_size)  # the shards' own tokenizer
        return {"lm": _shard_lm, "sft": _shard_sft, "classify": _shard_classify}[eval_set.kind](
            eval_set, tokenizer, row_len, labels)
    return {"lm": _raw_lm, "sft": _raw_sft, "classify": _raw_classify}[eval_set.kind](
        eval_set, tokenizer, row_len, labels)


def _decode(tokenizer, ids) -> str:
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def _eos(tokenizer, stored: int | None = None) -> int:
    """What ends a completion: the id the shards' manifest recorded (it may be an --eos-token), else the
    tokenizer's by role, as tools/shard_data.py chose it (a tokenizer without EOS, BERT's: its separator)."""
    if stored is not None:
        return int(stored)
    try:
        return eos_id(tokenizer)
    except DataError as e:
        raise EvalError(str(e)) from None


def document_pieces(seq, row_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """A token sequence as scoring pieces of at most row_len tokens, cut so that every token but the first is a
    target exactly once, each piece starting with the token before its first target."""
    seq = np.asarray(seq, np.int32)
    pieces = (seq[j:j + row_len] for j in range(0, len(seq) - 1, row_len - 1))
    return [(p, np.ones(len(p), np.float32)) for p in pieces]


def _lm_from_docs(docs: list[tuple[list[int], str]], tokenizer, row_len: int) -> Encoded:
    prefix = list(tokenizer("", add_special_tokens=True)["input_ids"])  # e.g. [BOS] for Llama, [] for GPT-2
    enc = Encoded(records=[], row_len=row_len)
    for ids, text in docs:
        seq = prefix + list(ids)
        if len(seq) < 2:
            continue  # a one-token document has nothing to predict
        enc.records.append({"text": text})
        enc.pieces += document_pieces(seq, row_len)
        unscored = 0 if prefix else len(tokenizer.decode(list(ids[:1])).encode("utf-8"))
        enc.n_bytes += len(text.encode("utf-8")) - unscored
    return enc


def _shard_lm(eval_set, tokenizer, row_len, labels) -> Encoded:
    docs = []
    for tokens, _, _ in eval_set.stored:
        ids = tokens[:-1] if len(tokens) and tokens[-1] == eval_set.eos_id else tokens
        if len(ids):
            docs.append((ids.tolist(), tokenizer.decode(ids.tolist())))
    return _lm_from_docs(docs, tokenizer, row_len)


def _raw_lm(eval_set, tokenizer, row_len, labels) -> Encoded:
    texts = [record["text"] for record, _ in eval_set.raw]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return _lm_from_docs([(i, t) for i, t in zip(ids, texts) if i], tokenizer, row_len)


def _strip_eos(ids: np.ndarray, eos: int) -> np.ndarray:
    return ids[:-1] if len(ids) and ids[-1] == eos else ids


def _shard_sft(eval_set, tokenizer, row_len, labels) -> Encoded:
    eos = _eos(tokenizer, eval_set.eos_id)
    enc = Encoded(records=[], references=[], row_len=row_len)
    for k, (tokens, mask, _) in enumerate(eval_set.stored):
        tokens, mask = tokens.astype(np.int32), mask.astype(np.float32)
        prompt, completion = split_sft_example(tokens, mask, f"{eval_set.describe()}, example {k}")
        reference = _decode(tokenizer, _strip_eos(completion, eos)).strip()
        enc.records.append({"prompt": _decode(tokenizer, prompt), "reference": reference})
        enc.prompts.append(prompt)
        enc.references.append(reference)
        enc.pieces.append((tokens, mask))
        enc.n_bytes += len(_decode(tokenizer, tokens[mask > 0]).encode("utf-8"))
    return enc


def _raw_sft(eval_set, tokenizer, row_len, labels) -> Encoded:
    """prompt/completion records; without any completion the set has prompts only (generation, no references)."""
    f = eval_set.fields
    has = [f["completion"] in record and record[f["completion"]] is not None for record, _ in eval_set.raw]
    if any(has) and not all(has):
        where = eval_set.raw[has.index(False)][1]
        raise EvalError(f"{where}: no field '{f['completion']}' while other examples have one; give every example "
                        "its reference completion (or none of them, to only generate).")
    encoder = SftEncoder(tokenizer.backend_tokenizer, _eos(tokenizer), row_len, "truncate", False, f["prompt"],
                         f["completion"])
    enc = Encoded(records=[], references=[] if all(has) else None, row_len=row_len)
    for record, where in eval_set.raw:
        try:
            if not all(has):
                prompt_text = record.get(f["prompt"])
                if not isinstance(prompt_text, str):
                    raise EvalError(f"{where}: no text field '{f['prompt']}' (fields: {', '.join(record)}); "
                                    "set --prompt-field.")
                prompt = np.asarray(tokenizer.backend_tokenizer.encode(prompt_text, add_special_tokens=True).ids,
                                    np.int32)
                enc.records.append({"prompt": prompt_text, "reference": None})
                enc.prompts.append(prompt)
                continue
            example = encoder.encode(record, where)
        except ExampleError as e:
            raise EvalError(str(e)) from None
        if example is None:
            raise EvalError(f"{where}: the completion alone is longer than the model's {row_len - 1} positions.")
        tokens, mask = example.tokens.astype(np.int32), example.mask.astype(np.float32)
        prompt, _ = split_sft_example(tokens, mask, where)
        reference = record[f["completion"]].strip()
        enc.records.append({"prompt": record[f["prompt"]], "reference": reference})
        enc.prompts.append(prompt)
        enc.references.append(reference)
        enc.pieces.append((tokens, mask))
        enc.n_bytes += len(record[f["completion"]].encode("utf-8"))
    return enc


def _class_index(labels: list | None, what: str) -> dict[str, int]:
    if not labels:
        raise EvalError(f"{what}: classification needs the model's class list (labels.json in the WORKDIR, or "
                        "id2label of a Hugging Face classifier); the model has none.")
    return {str(v): i for i, v in enumerate(labels)}


def _shard_classify(eval_set, tokenizer, row_len, labels) -> Encoded:
    check_labels(labels, eval_set.labels, eval_set.shards_dir)  # a label the run never saw is an error
    enc = Encoded(records=[], row_len=row_len)
    for tokens, _, label_id in eval_set.stored:
        ids = tokens.astype(np.int32)[:row_len]
        enc.records.append({"text": _decode(tokenizer, ids), "label": str(labels[label_id])})
        enc.inputs.append(ids)
        enc.class_ids.append(int(label_id))
    return enc


def _raw_classify(eval_set, tokenizer, row_len, labels) -> Encoded:
    index = _class_index(labels, eval_set.source)
    f = eval_set.fields
    encoder = ClassifyEncoder(tokenizer.backend_tokenizer, row_len, "truncate", f["text"], f["label"])
    enc = Encoded(records=[], row_len=row_len)
    for record, where in eval_set.raw:
        try:
            example = encoder.encode(record, where)
        except ExampleError as e:
            raise EvalError(str(e)) from None
        if str(example.label) not in index:
            raise EvalError(f"{where}: label {example.label!r} was never seen in training (the model's classes: "
                            f"{list(labels)}).")
        enc.records.append({"text": record[f["text"]], "label": str(example.label)})
        enc.inputs.append(example.tokens.astype(np.int32))
        enc.class_ids.append(index[str(example.label)])
    return enc


def majority_class(eval_set: EvalSet) -> dict | None:
    """The training split's most frequent class ('label') and the accuracy on this eval set of always answering it
    ('accuracy'); None without training examples (evaluation-only shards: every count 0, no class is the most
    frequent)."""
    if eval_set.kind != "classify" or not eval_set.label_counts or not sum(eval_set.label_counts) \
            or not eval_set.stored:
        return None
    top = int(np.argmax(eval_set.label_counts))
    hits = sum(label_id == top for _, _, label_id in eval_set.stored)
    return {"label": str(eval_set.labels[top]), "accuracy": hits / len(eval_set.stored)}
