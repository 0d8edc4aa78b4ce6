"""Clean, tokenize and write a corpus as ArrayRecord token shards with a manifest, for lmtrain's loader.

    python tools/shard_data.py --input 'data/*.jsonl' --tokenizer tok/ --output shards/
    python tools/shard_data.py --builtin --tokenizer workdir/tokenizer --output workdir/shards   # no download

Stages: read (lmtrain.prep.text_sources) -> clean in worker processes (normalize, filter, hash,
MinHash) -> dedup in corpus order -> split train/validation by a hash of the document's text ->
tokenize in batches (the tokenizers library uses every core) with EOS after each document ->
shards of about --shard-mb of tokens, each written to a temporary name, fsynced and renamed
(lmtrain.data.shard_writer). Task records (--format) are encoded and stored as their format says
(lmtrain.data.formats), a plugin's format included.

Re-running with the same inputs and options skips the shards already finished (their sha256 is
checked); manifest.json is written last, so a directory without it is unfinished.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import errno
import json
import multiprocessing
import os
import queue
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import xxhash
from tqdm import tqdm

from lmtrain.config import ConfigError
from lmtrain.data.examples import ExampleError, SourceError, ordered_labels
from lmtrain.data.formats import FORMATS, ExampleFormat, get_format
from lmtrain.data.shard_files import MANIFEST, SHARDS_TOKENIZER, SPLITS, ShardError, token_dtype
from lmtrain.data.shard_writer import KEPT, SplitWriter, open_output, read_json
from lmtrain.data.shards import FORMAT, load_manifest, tokenizer_fingerprint
from lmtrain.data.splits import is_validation_doc
from lmtrain.data.tokenizer import add_special_tokens, chat_template_markers, save_tokenizer_dir, split_markers
from lmtrain.data.tokenizer import eos_id as hf_eos_id
from lmtrain.data.tokenizer import load_tokenizer as load_hf_tokenizer
from lmtrain.paths import as_path, copy_tree, is_remote
from lmtrain.plugins import load_plugins
from lmtrain.prep import beam_engine, builtin_tasks
from lmtrain.prep.cleaning import (
    CleanedDocument,
    CleaningOptions,
    CleaningReport,
    Deduplicator,
    clean_batch,
    clean_or_keep,
    split_long_document,
)
from lmtrain.prep.text_sources import (
    CorpusSpec,
    add_corpus_args,
    check_spec,
    corpus_from_args,
    expand_files,
    file_stats,
    iter_documents,
    iter_records,
)

RUNNERS = ("local", "beam")
ENGINE_OPTIONS = ("runner", "beam_options")
PREF_OPTIONS = ("chosen_field", "rejected_field")  # how the shards were made, not what they hold: not in manifests
BATCH_CHARS = 4 << 20  # characters per cleaning/tokenizing batch at most (besides --batch-docs)
TOKENIZE_CHARS = 1 << 20  # characters encoded by one encode_batch call at most


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_corpus_args(p)
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (tools/train_tokenizer.py or any HF one)")
    p.add_argument("--output", required=True, help="shard directory to write")
    p.add_argument("--add-special-tokens", default="", help="add these tokens (comma-separated) to the tokenizer as "
                   "special tokens, or 'auto': the chat\ntemplate's markers that are not single tokens (e.g. "
                   "<|im_start|>). The extended tokenizer is saved as\nOUTPUT/tokenizer and training uses it")
    p.add_argument("--eos-token", default="", help="the token that ends every document and sft completion (default: "
                   "the tokenizer's EOS,\nor its separator when it has none, e.g. BERT's [SEP])")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="share of documents in the validation split (default 0.01; 0.1 for --builtin-task)")
    p.add_argument("--test-fraction", type=float, default=None,
                   help="share in a test split (task formats; default 0, 0.1 for --builtin-task)")
    t = p.add_argument_group("task data (--format sft, chat, classify; see the README's fine-tuning section)")
    t.add_argument("--format", default="text", choices=tuple(FORMATS),
                   help="text: documents for language modelling (default); sft: prompt/completion records;\n"
                        "chat: `messages` rendered with the tokenizer's chat template; classify: text/label records;\n"
                        "ner: words and one tag per word (token classification, e.g. named entities); or a format\n"
                        "a plugin registers (LMTRAIN_PLUGINS)")
    t.add_argument("--builtin-task", default="", choices=("", *builtin_tasks.TASKS),
                   help="a demo task made from Python's standard library (no download): sft (signature ->\n"
                        "docstring summary), classify (which area of the stdlib a docstring is from) or pref\n"
                        "(signature -> its own summary preferred to another function's)")
    t.add_argument("--seq-len", type=int, default=0, help="task formats: the data.seq_len to train with; longer "
                   "examples follow --too-long")
    t.add_argument("--too-long", default="truncate", choices=("truncate", "drop"),
                   help="an example longer than --seq-len: truncate (sft: the prompt from the left; chat: the\n"
                        "conversation from the left; classify: the text's end) or drop it; both are counted")
    t.add_argument("--train-on-prompt", action="store_true", help="sft/chat: train on every token, not only the "
                   "completion / assistant turns")
    t.add_argument("--prompt-field", default="prompt")
    t.add_argument("--completion-field", default="completion")
    t.add_argument("--chosen-field", default="chosen", help="pref: the preferred completion (text or messages)")
    t.add_argument("--rejected-field", default="rejected", help="pref: the other completion (text or messages)")
    t.add_argument("--messages-field", default="messages")
    t.add_argument("--label-field", default="label")
    t.add_argument("--tokens-field", default="tokens", help="ner: the list of words")
    t.add_argument("--tags-field", default="tags", help="ner: the list of tags, one per word (strings or ints)")
    t.add_argument("--chat-template", default="", help="chat: a Jinja chat template file, instead of the tokenizer's")
    t.add_argument("--labels", default="", help="classify: the label set, comma-separated, in the order of the "
                   "class ids (default: the training labels, sorted)")
    t.add_argument("--labels-from", default="", help="classify: take the label set from this shard directory's "
                   "manifest (evaluation data made apart from the training data)")
    p.add_argument("--shard-mb", type=float, default=128, help="target size of a shard's token data, in MiB")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="cleaning processes (1: in-process)")
    p.add_argument("--batch-docs", type=int, default=512, help="documents per cleaning/tokenizing batch")
    p.add_argument("--max-doc-chars", type=int, default=1_000_000,
                   help="split longer documents into pieces of at most this many characters, at whitespace, each\n"
                        "a document of its own; bounds memory (~50 bytes per character of a piece). 0: never split")
    p.add_argument("--no-clean", action="store_true", help="turn every cleaning rule off")
    p.add_argument("--unicode", default="NFC", choices=("NFC", "NFKC", "none"), help="Unicode normalization")
    p.add_argument("--no-whitespace", action="store_true", help="keep whitespace as it is")
    p.add_argument("--min-chars", type=int, default=20, help="drop documents shorter than this after normalization")
    p.add_argument("--no-exact-dedup", action="store_true")
    p.add_argument("--no-near-dedup", action="store_true")
    p.add_argument("--near-dup-threshold", type=float, default=0.8, help="MinHash Jaccard estimate that drops")
    p.add_argument("--num-perm", type=int, default=128, help="MinHash permutations")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty --output that is not a shard directory of these inputs and options\n"
                        "(replaces its manifest and shards; other files are kept unless a shard has their name)")
    p.add_argument("--staging-dir", default="",
                   help="for a gs:// --output: local directory where shards are written before upload\n"
                        "(default ~/.cache/lmtrain/shard-staging/<hash of the output>; kept for resume until done;\n"
                        "--runner beam stages under OUTPUT/.beam-staging instead, where every worker reaches it)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    e = p.add_argument_group("engine (the same stages and output either way)")
    e.add_argument("--runner", default="local", choices=RUNNERS,
                   help="local: worker processes on this machine (default); beam: an Apache Beam pipeline\n"
                        "(pip install 'lmtrain[beam]'), run where --beam-options says")
    e.add_argument("--beam-options", default="",
                   help="Beam pipeline options, after an '=': --beam-options='--runner=DataflowRunner\n"
                        "--project=P --region=R --temp_location=gs://B/tmp' (default: the DirectRunner here)")
    return p.parse_args(argv)


def cleaning_options(args: argparse.Namespace) -> CleaningOptions:
    if args.no_clean:
        return CleaningOptions(unicode_form="", normalize_whitespace=False, min_chars=1, exact_dedup=False,
                               near_dedup=False)
    return CleaningOptions(unicode_form="" if args.unicode == "none" else args.unicode,
                           normalize_whitespace=not args.no_whitespace, min_chars=args.min_chars,
                           exact_dedup=not args.no_exact_dedup, near_dedup=not args.no_near_dedup,
                           near_dup_threshold=args.near_dup_threshold, num_perm=args.num_perm)


def split_of(text: str, val_fraction: float) -> str:
    """The document's split, a function of its (cleaned) text alone: stable across re-runs and orderings."""
    return "validation" if is_validation_doc(text, val_fraction) else "train"


def _batches(docs: Iterator[str], size: int, max_chars: int = BATCH_CHARS) -> Iterator[list[str]]:
    """Batches of `size` documents, or fewer when they reach max_chars: memory per batch is bounded."""
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if len(batch) == size or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def split_long_documents(docs: Iterator[str], max_chars: int, counts: collections.Counter) -> Iterator[str]:
    """Documents longer than max_chars become pieces (counted in `counts`), so memory stays bounded."""
    for doc in docs:
        pieces = split_long_document(doc, max_chars)
        if len(pieces) > 1:
            counts["split_long"] += 1
            counts["split_long_pieces"] += len(pieces)
        yield from pieces


def cleaned_batches(spec: CorpusSpec, opts: CleaningOptions, workers: int, batch_docs: int, max_doc_chars: int = 0,
                    counts: collections.Counter | None = None) -> Iterator[list[CleanedDocument]]:
    """Cleaned batches in corpus order; at most 2 * workers batches in flight, so memory stays bounded."""
    docs = split_long_documents(iter_documents(spec), max_doc_chars, counts if counts is not None else Counter())
    batches = _batches(docs, batch_docs)
    if workers <= 1 or not opts.enabled():
        for batch in batches:
            yield [clean_or_keep(t, opts) for t in batch]
        return
    # spawn: the parent may hold threads (JAX, the tokenizer's pool) that fork would copy in a bad state.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        in_flight: collections.deque = collections.deque()
        for batch in batches:
            in_flight.append(pool.apply_async(clean_batch, (batch, opts)))
            if len(in_flight) >= 2 * workers:
                yield in_flight.popleft().get()
        while in_flight:
            yield in_flight.popleft().get()


def read_ahead(batches: Iterator, depth: int = 4) -> Iterator:
    """Run the reading and cleaning generator in a thread, so it overlaps tokenization (which
    releases the GIL); errors are re-raised here, in order."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in batches:
                if not put((batch, None)):
                    return
            put((done, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put((None, e))
        finally:
            batches.close()  # stops a cleaning pool when the consumer gave up early

    thread = threading.Thread(target=produce, name="shard_data-reader", daemon=True)
    thread.start()
    try:
        while True:
            batch, error = items.get()
            if error is not None:
                raise error
            if batch is done:
                return
            yield batch
    finally:
        stop.set()
        thread.join(timeout=5)


def tokenize_in_chunks(tokenizer, docs: list[tuple[str, str]], max_chars: int = TOKENIZE_CHARS
                       ) -> Iterator[tuple[str, np.ndarray]]:
    """(split, token ids) of each (split, text), in order, encoding at most max_chars at once.

    A tokenizers Encoding holds offsets, type ids, masks and token strings besides the ids, about
    200 bytes per character of text; encoding in chunks and keeping only the ids bounds that.
    """
    start = 0
    while start < len(docs):
        end, chars = start, 0
        while end < len(docs) and (end == start or chars + len(docs[end][1]) <= max_chars):
            chars += len(docs[end][1])
            end += 1
        encodings = tokenizer.encode_batch([text for _, text in docs[start:end]], add_special_tokens=False)
        for (split, _), enc in zip(docs[start:end], encodings, strict=True):
            yield split, np.asarray(enc.ids, np.int64)
        start = end


def run_fingerprint(args: argparse.Namespace, spec: CorpusSpec, opts: CleaningOptions, tokenizer_fp: str) -> dict:
    """Everything that determines the shards' content; a resumed run must match it exactly."""
    inputs = spec.describe()
    if spec.files:  # a changed input file must not be mixed with shards of the old one
        inputs["file_stats"] = file_stats(expand_files(spec.files))
    return {"corpus": inputs, "cleaning": dataclasses.asdict(opts), "val_fraction": args.val_fraction,
            "shard_mb": args.shard_mb, "max_doc_chars": args.max_doc_chars, "tokenizer_fingerprint": tokenizer_fp,
            **({"eos_token": args.eos_token} if args.eos_token else {})}  # absent by default: older runs still match


@dataclasses.dataclass
class ShardTokenizer:
    """The tokenizer the shards are written with: --tokenizer as lmtrain loads it, plus any special tokens
    --add-special-tokens adds; an extended tokenizer is saved beside the shards (OUTPUT/tokenizer), where
    training finds it through the manifest."""

    hf: object  # the transformers tokenizer (chat templates); its backend encodes in batches on every core
    source: str  # --tokenizer
    eos_id: int  # what ends every document and sft completion
    fingerprint: str
    added: list[str] = dataclasses.field(default_factory=list)
    staged: tempfile.TemporaryDirectory | None = None  # the extended tokenizer's files until they join the shards

    @property
    def backend(self):
        return self.hf.backend_tokenizer

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def extend(self, option: str, chat_template: str | None) -> None:
        """--add-special-tokens (a comma list, or 'auto': the chat template's markers that are not single
        tokens); without it, warn once when the template's markers are split into pieces."""
        markers = chat_template_markers(chat_template) if chat_template else []
        split = split_markers(self.hf, markers)
        if option.strip() == "auto":
            if chat_template is None:
                raise SourceError("--add-special-tokens auto adds the chat template's markers: use it with --format "
                                  "chat, or list the tokens to add (--add-special-tokens '<|a|>,<|b|>').")
            wanted = split
        else:
            wanted = [t.strip() for t in option.split(",") if t.strip()]
            if split and not wanted:
                print(f"shard_data: warning: the chat template's markers {', '.join(split)} are not single tokens of "
                      f"tokenizer {self.source}, so the model must learn each as a sequence of pieces; pass "
                      "--add-special-tokens auto to add them as special tokens (training then grows the model's "
                      "embedding to the new vocabulary).", file=sys.stderr)
        self.added = add_special_tokens(self.hf, wanted)
        if self.added:
            self.staged = tempfile.TemporaryDirectory(prefix="lmtrain-tokenizer-")
            self.hf.save_pretrained(self.staged.name)
            self.fingerprint = tokenizer_fingerprint(self.staged.name)

    def manifest_entry(self, output: str) -> dict:
        if not self.added:
            return {"dir": str(as_path(self.source)), "fingerprint": self.fingerprint}
        return {"dir": str(as_path(output) / SHARDS_TOKENIZER), "fingerprint": self.fingerprint,
                "extends": {"dir": str(as_path(self.source)), "fingerprint": tokenizer_fingerprint(self.source)},
                "added_special_tokens": self.added}

    def save_beside(self, out: Path) -> None:
        """The extended tokenizer into the shard directory, whole, before the manifest that names it."""
        if self.staged is not None:
            save_tokenizer_dir(lambda directory: copy_tree(self.staged.name, directory), out / SHARDS_TOKENIZER)


def load_tokenizer(tokenizer_dir: str, eos_token: str = "") -> ShardTokenizer:
    """--tokenizer loaded by lmtrain's one loader (padding and truncation off, no code from the directory),
    so the ids are those of transformers' own tokenizer call. Documents end with the EOS, or the separator
    of a tokenizer without one (BERT), or `eos_token`.
    """
    path = as_path(tokenizer_dir)
    if not (path / "tokenizer.json").exists():
        raise SourceError(f"tokenizer directory {path} has no tokenizer.json (make one with tools/train_tokenizer.py).")
    hf = load_hf_tokenizer(path)
    return ShardTokenizer(hf, tokenizer_dir, hf_eos_id(hf, eos_token), tokenizer_fingerprint(path))


def eval_only(val_fraction: float, test_fraction: float) -> bool:
    """Every example in validation (--val-fraction 1) or in test (--test-fraction 1): a labelled file made
    into a whole evaluation split, classes from --labels-from (or --labels), no train split to speak of."""
    return sorted((val_fraction, test_fraction)) == [0, 1]


def split_of_example(key: str, val_fraction: float, test_fraction: float) -> str:
    """train, validation or test as a function of the example's key alone (validation as for text)."""
    if eval_only(val_fraction, test_fraction):  # (h below can round to 1.0)
        return "validation" if val_fraction == 1 else "test"
    h = xxhash.xxh64_intdigest(key.encode("utf-8")) / 2**64
    return "validation" if h < val_fraction else "test" if h < val_fraction + test_fraction else "train"


def _example_key(fmt: ExampleFormat, record: dict, args: argparse.Namespace) -> str:
    """What decides an example's split: its input (the field the format's key_field option names), so one
    prompt or text never lands in two splits."""
    field = getattr(args, fmt.key_field)
    return json.dumps(record.get(field), sort_keys=True, ensure_ascii=False)


def _task_source(args: argparse.Namespace):
    """(example format, records() -> iterator of (record, where), corpus description, fractions)."""
    if args.builtin_task:
        given = [f for f, on in (("--input", args.input), ("--hf-dataset", args.hf_dataset), ("--tfds", args.tfds),
                                 ("--builtin", args.builtin)) if on]
        if given or args.format not in ("text", args.builtin_task):
            raise SourceError(f"--builtin-task {args.builtin_task} is its own input (format {args.builtin_task}); "
                              f"drop {', '.join(given) or '--format ' + args.format}.")
        if args.builtin_task == "classify":
            args.text_field, args.label_field = "text", "label"
        else:
            args.prompt_field, args.completion_field = "prompt", "completion"
            args.chosen_field, args.rejected_field = "chosen", "rejected"
        val = 0.1 if args.val_fraction is None else args.val_fraction
        test = 0.1 if args.test_fraction is None else args.test_fraction
        items = list(builtin_tasks.task_records(args.builtin_task))  # parsed once, read twice
        return (args.builtin_task, lambda: iter(items),
                {"builtin_task": args.builtin_task, "python": sys.version.split()[0]}, val, test)
    if args.tfds or args.builtin:
        raise SourceError(f"--format {args.format} reads records from --input files (.jsonl, .parquet, .csv) or "
                          "--hf-dataset.")
    spec = corpus_from_args(args)
    check_spec(spec)
    corpus = spec.describe()
    if spec.files:
        corpus["file_stats"] = file_stats(expand_files(spec.files))
    val = 0.1 if args.val_fraction is None else args.val_fraction
    test = 0.0 if args.test_fraction is None else args.test_fraction
    return args.format, lambda: iter_records(spec), corpus, val, test


def _pad_id(tokenizer_dir: str, tokenizer, eos_id: int) -> int:
    path = as_path(tokenizer_dir)
    pad = None
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        pad = pad or (read_json(path / name) or {}).get("pad_token")
    if isinstance(pad, dict):
        pad = pad.get("content")
    pad_id = tokenizer.token_to_id(pad) if pad else None
    return eos_id if pad_id is None else int(pad_id)


@dataclasses.dataclass
class TaskRun:
    """What a run of a record format settles before reading its records; both engines start from it."""

    args: argparse.Namespace
    example_format: str
    fmt: ExampleFormat
    records: Callable[[], Iterator[tuple[dict, str]]]
    corpus: dict
    val: float
    test: float
    tok: ShardTokenizer
    encoder: object
    dtype: np.dtype

    def split_of(self, record: dict) -> str:
        return split_of_example(_example_key(self.fmt, record, self.args), self.val, self.test)

    def labels_found(self, record: dict, where: str) -> list[tuple[object, str, str]]:
        """Check a record before anything is written; (label, split, where) of each class label it holds."""
        found = self.encoder.validate(record, where)
        if not self.fmt.label_vocab:
            return []
        split = self.split_of(record)
        return [(label, split, where) for label in (found if self.fmt.label_vocab == "token" else [found])]

    @property
    def splits(self) -> tuple[str, ...]:
        return SPLITS + (("test",) if self.test > 0 else ())  # an evaluation-only set still lists an empty train


def prepare_task(args: argparse.Namespace) -> TaskRun:
    """The checks and the tokenizer of a record format's run, before any record is read."""
    example_format, records, corpus, val, test = _task_source(args)
    fmt = get_format(example_format)
    if args.seq_len <= 1:
        raise SourceError(f"--format {example_format} needs --seq-len N (> 1): the data.seq_len you will train with; "
                          "longer examples follow --too-long.")
    if test == 1 and args.val_fraction is None:  # an evaluation-only test set: no default validation share
        val = 0.0
    if val < 0 or test < 0 or (val + test >= 1 and not eval_only(val, test)):
        raise SourceError(f"--val-fraction {val} and --test-fraction {test} must be >= 0 and sum to less than 1 (or "
                          "one of them 1, the other 0: an evaluation-only set).")
    tok, encoder = task_encoder(args, fmt)
    return TaskRun(args, example_format, fmt, records, corpus, val, test, tok, encoder, token_dtype(tok.vocab_size))


def task_encoder(args: argparse.Namespace, fmt: ExampleFormat) -> tuple[ShardTokenizer, object]:
    """The tokenizer (extended by --add-special-tokens) and the format's record encoder."""
    tok = load_tokenizer(args.tokenizer, args.eos_token)
    encoder = fmt.make_encoder(tok, args)
    tok.extend(args.add_special_tokens, getattr(encoder, "chat_template", None))
    return tok, encoder


def check_has_train(any_train: bool, examples: int, val: float, test: float) -> None:
    if not eval_only(val, test) and not any_train:
        raise SourceError(f"no training examples: all {examples} examples fall into validation or test "
                          f"(--val-fraction {val}, --test-fraction {test}).")


def check_eval_only_classes(args: argparse.Namespace, fmt: ExampleFormat, val: float, test: float) -> None:
    if fmt.label_vocab and eval_only(val, test) and not (args.labels_from or args.labels):
        flag = "--val-fraction 1" if val == 1 else "--test-fraction 1"
        raise SourceError(f"an evaluation-only set ({flag}) takes its classes, in their order, from the training "
                          "data: pass --labels-from TRAIN_SHARDS (or --labels).")


def class_labels(args: argparse.Namespace, train_labels: set, where_first: Callable[[object], str], val: float,
                 test: float) -> tuple[list, str]:
    """The classes of a label format, in class-id order, and where they came from: --labels-from's, or
    --labels, or the training split's labels sorted."""
    if args.labels_from:
        manifest = load_manifest(args.labels_from)
        if "labels" not in manifest:
            raise SourceError(f"--labels-from {args.labels_from}: those shards are not classification data "
                              "(no labels in the manifest).")
        labels, origin = manifest["labels"], f"the labels of {args.labels_from}"
    elif args.labels:
        labels, origin = [x.strip() for x in args.labels.split(",") if x.strip()], "--labels"
    else:
        labels, origin = ordered_labels(train_labels, where_first), TRAIN_LABELS
    names = [str(v) for v in labels]
    if len(set(names)) != len(names) or len(names) < 2:
        raise SourceError(f"{origin} must be at least 2 distinct labels; got {labels}.")
    return labels, origin


TRAIN_LABELS = "the training split's labels"


def check_label(label, split: str, where: str, labels: list, origin: str) -> None:
    """A label of a record must be one of the classes; the error names the record."""
    names = [str(v) for v in labels]
    if str(label) in names:
        return
    if origin == TRAIN_LABELS:
        raise ExampleError(f"{where}: label {label!r} ({split} split) never occurs in the training split, so "
                           "a model trained on it cannot predict it. Fix the label, or list every class with "
                           "--labels.")
    raise ExampleError(f"{where}: label {label!r} is not one of {origin} ({', '.join(names)}).")


def _first_pass(run: TaskRun):
    """Check every record before anything is written (fields, turns, labels); return the classes of a format
    with a label vocabulary (classify, ner), or None.

    A label of the validation or test split that is not a class is an error naming the example.
    """
    first_seen: dict = {}
    train_labels: set = set()
    seen: list[tuple[object, str, str]] = []
    any_train, examples = False, 0
    for record, where in run.records():
        examples += 1
        any_train = any_train or run.split_of(record) == "train"
        for label, split, at in run.labels_found(record, where):
            first_seen.setdefault(label, at)
            if split == "train":
                train_labels.add(label)
            seen.append((label, split, at))
    check_eval_only_classes(run.args, run.fmt, run.val, run.test)
    check_has_train(any_train, examples, run.val, run.test)
    if not run.fmt.label_vocab:
        return None
    labels, origin = class_labels(run.args, train_labels, first_seen.__getitem__, run.val, run.test)
    for label, split, where in seen:
        check_label(label, split, where, labels, origin)
    return labels


def task_fingerprint(run: TaskRun, labels: list | None) -> tuple[dict, dict]:
    """(fingerprint, options) of a record format's run: what its shards' content depends on."""
    options = {k: v for k, v in vars(run.args).items()
               if k not in ("quiet", "force", "staging_dir", "output", "workers", "batch_docs", *ENGINE_OPTIONS)}
    if run.example_format != "pref":  # pref's own options: other formats' fingerprints stay as they were
        options = {k: v for k, v in options.items() if k not in PREF_OPTIONS}
    fingerprint = {"corpus": run.corpus, "example_format": run.example_format, "options": options,
                   "val_fraction": run.val, "test_fraction": run.test, "labels": labels,
                   "tokenizer_fingerprint": run.tok.fingerprint,
                   "chat_template": getattr(run.encoder, "chat_template", None)}
    return fingerprint, options


def new_task_totals(splits: tuple[str, ...], labels: list | None) -> dict[str, dict]:
    return {s: {"documents": 0, "tokens": 0, "target_tokens": 0, "label_counts": [0] * len(labels or [])}
            for s in splits}


def count_example(info: dict, fmt: ExampleFormat, arrays: dict) -> bool:
    """Add a stored example to its split's totals; whether the format counts trained-on tokens."""
    info["documents"] += 1
    info["tokens"] += len(arrays["tokens"])
    targets = fmt.target_tokens(arrays)
    if targets is not None:
        info["target_tokens"] += targets
    for class_id in fmt.class_ids(arrays):
        info["label_counts"][class_id] += 1
    return targets is not None


def check_kept_examples(totals: dict[str, dict], read: int, val: float, test: float) -> None:
    if not totals["train"]["documents"] and not eval_only(val, test):
        raise SourceError(f"no training examples: {read} records read, {sum(t['documents'] for t in totals.values())}"
                          f" kept, none in the training split (--val-fraction {val}, --test-fraction {test}).")


def task_manifest(run: TaskRun, labels: list | None, fingerprint: dict, options: dict, totals: dict[str, dict],
                  counts_targets: bool, read: int, counts: Counter, shards: dict[str, list[dict]],
                  seconds: float) -> dict:
    """The manifest of a record format's shards (the same from either engine)."""
    args = run.args
    for info in totals.values():
        if labels is None:
            del info["label_counts"]
        if not counts_targets:  # a classifier's examples do not count trained-on tokens
            del info["target_tokens"]
    manifest = {
        "format": FORMAT,
        "example_format": run.example_format,
        "seq_len": args.seq_len,
        "token_dtype": run.dtype.name,
        "vocab_size": run.tok.vocab_size,
        "eos_id": run.tok.eos_id,
        "pad_id": _pad_id(args.tokenizer, run.tok.backend, run.tok.eos_id),
        "tokenizer": run.tok.manifest_entry(args.output),
        "fingerprint": fingerprint,
        "options": options,
        "examples": {"read": read, "kept": sum(t["documents"] for t in totals.values()),
                     "truncated": counts["truncated"], "dropped_too_long": counts["dropped_too_long"],
                     "too_long_policy": args.too_long, "train_on_prompt": bool(args.train_on_prompt)},
        "splits": {s: {**totals[s], "shards": shards[s]} for s in run.splits},
        "seconds": round(seconds, 2),
    }
    if labels is not None:
        manifest["labels"] = labels
    _check_totals(manifest)
    return manifest


def shard_examples(args: argparse.Namespace) -> dict:
    """The formats made from records (sft, chat, classify, ner, a plugin's): records -> examples -> shards,
    with a manifest like text's. The format makes the encoder and says what a shard stores of an example."""
    run = prepare_task(args)
    fmt, encoder = run.fmt, run.encoder
    labels = _first_pass(run)
    label_ids = {str(v): i for i, v in enumerate(labels or [])}
    fingerprint, options = task_fingerprint(run, labels)
    remote, output, done = open_output(args.output, fingerprint, run.splits, args.force, args.staging_dir)
    if done is not None:
        return done
    out = output.out
    finished = output.finished_shards()
    shard_bytes = max(1, int(args.shard_mb * 2**20))
    writers = {s: SplitWriter(out, s, run.dtype, shard_bytes, finished[s], output.claim, output.run_id, fmt)
               for s in run.splits}
    totals = new_task_totals(run.splits, labels)
    counts_targets = False
    read = 0
    start = time.time()
    bar = _progress_bar(args.quiet)
    try:
        for record, where in run.records():
            read += 1
            bar.update(1)
            example = encoder.encode(record, where)
            if example is None:
                continue
            split = run.split_of(record)
            arrays = fmt.arrays(example, label_ids)
            counts_targets = count_example(totals[split], fmt, arrays) or counts_targets
            if writers[split].wants() and writers[split].write(**arrays) is not None:
                output.save_progress(writers)
        bar.close()
        check_kept_examples(totals, read, run.val, run.test)
        for w in writers.values():
            w.close()
    except BaseException:
        for w in writers.values():
            w.abort()
        output.discard_temporaries()
        raise
    manifest = task_manifest(run, labels, fingerprint, options, totals, counts_targets, read, encoder.counts,
                             {s: w.finished for s, w in writers.items()}, time.time() - start)
    run.tok.save_beside(out)
    output.finish(manifest)
    if remote is not None:
        remote.publish(manifest)
    return manifest


@dataclasses.dataclass
class TextRun:
    """What a text run settles before reading its documents; both engines start from it."""

    args: argparse.Namespace
    spec: CorpusSpec
    opts: CleaningOptions
    tok: ShardTokenizer
    dtype: np.dtype
    fingerprint: dict


def prepare_text(args: argparse.Namespace) -> TextRun:
    """The checks and the tokenizer of a text run, before any document is read."""
    args.val_fraction = 0.01 if args.val_fraction is None else args.val_fraction
    if args.test_fraction:
        raise SourceError("--test-fraction is for task formats (--format sft, chat, classify); text has train and "
                          "validation splits.")
    spec = corpus_from_args(args)
    check_spec(spec)  # missing or unreadable inputs fail before anything is written
    if not 0 <= args.val_fraction < 1:
        raise SourceError(f"--val-fraction {args.val_fraction} must be in [0, 1).")
    if args.max_doc_chars < 0:
        raise SourceError(f"--max-doc-chars {args.max_doc_chars} must be >= 0 (0: never split documents).")
    opts = cleaning_options(args)
    tok = load_tokenizer(args.tokenizer, args.eos_token)
    tok.extend(args.add_special_tokens, None)
    return TextRun(args, spec, opts, tok, token_dtype(tok.vocab_size), run_fingerprint(args, spec, opts, tok.fingerprint))


def document_tokens(tokenizer, eos_id: int, docs: list[tuple[str, str]]) -> Iterator[tuple[str, np.ndarray]]:
    """(split, tokens) of each (split, cleaned text): its ids, then the EOS that ends every document."""
    for split, ids in tokenize_in_chunks(tokenizer, docs):
        yield split, np.append(ids, eos_id)


def check_kept_documents(report: CleaningReport, documents_total: dict[str, int], val_fraction: float) -> None:
    if not report["kept"]:
        raise SourceError(f"the corpus is empty after cleaning: {_removed_text(report.summary())}.")
    if not documents_total["train"]:
        raise SourceError(f"no training documents: all {report['kept']} kept documents fell into validation "
                          f"(--val-fraction {val_fraction}).")


def text_manifest(run: TextRun, report: CleaningReport, split_counts: Counter, documents_total: dict[str, int],
                  tokens_total: dict[str, int], shards: dict[str, list[dict]], seconds: float) -> dict:
    """The manifest of text shards (the same from either engine)."""
    args = run.args
    manifest = {
        "format": FORMAT,
        "token_dtype": run.dtype.name,
        "vocab_size": run.tok.vocab_size,
        "eos_id": run.tok.eos_id,
        "tokenizer": run.tok.manifest_entry(args.output),
        "fingerprint": run.fingerprint,
        "options": {k: v for k, v in vars(args).items() if k not in ("quiet", *ENGINE_OPTIONS)},
        "cleaning": report.summary(),
        "long_documents": {"max_doc_chars": args.max_doc_chars, "split": split_counts["split_long"],
                           "pieces": split_counts["split_long_pieces"]},
        "splits": {s: {"documents": documents_total[s], "tokens": tokens_total[s], "shards": shards[s]}
                   for s in SPLITS},
        "seconds": round(seconds, 2),
    }
    _check_totals(manifest)
    return manifest


def shard_corpus(args: argparse.Namespace) -> dict:
    """Run the whole pipeline on the engine --runner names; return the manifest."""
    if getattr(args, "runner", "local") == "beam":
        return beam_engine.shard_with_beam(args)  # it imports apache_beam (the [beam] extra) only now
    if args.builtin_task or not get_format(args.format).from_corpus:
        return shard_examples(args)
    return shard_text(args)


def shard_text(args: argparse.Namespace) -> dict:
    """The text pipeline on this machine: read -> clean (worker processes) -> dedup -> split -> tokenize -> shards."""
    run = prepare_text(args)
    opts, tok = run.opts, run.tok
    tokenizer, eos_id = tok.backend, tok.eos_id
    remote, output, done = open_output(args.output, run.fingerprint, SPLITS, args.force, args.staging_dir)
    if done is not None:
        return done
    out = output.out
    finished = output.finished_shards()
    shard_bytes = max(1, int(args.shard_mb * 2**20))
    writers = {s: SplitWriter(out, s, run.dtype, shard_bytes, finished[s], output.claim, output.run_id)
               for s in SPLITS}
    report = CleaningReport()
    dedup = Deduplicator(opts)
    tokens_total = {s: sum(e["tokens"] for e in finished[s]) for s in SPLITS}
    documents_total = {s: 0 for s in SPLITS}
    start = time.time()
    bar = _progress_bar(args.quiet)
    try:
        split_counts: Counter = Counter()
        for batch in read_ahead(cleaned_batches(run.spec, opts, args.workers, args.batch_docs, args.max_doc_chars,
                                                split_counts)):
            to_tokenize: list[tuple[str, str]] = []
            for doc in batch:
                report["read"] += 1
                if doc.text is None:
                    report[doc.reason] += 1
                    continue
                if opts.exact_dedup or opts.near_dedup:
                    reason = dedup.is_duplicate(doc)
                    if reason:
                        report[reason] += 1
                        continue
                report["kept"] += 1
                split = split_of(doc.text, args.val_fraction)
                documents_total[split] += 1
                if writers[split].wants():
                    to_tokenize.append((split, doc.text))
            for split, tokens in document_tokens(tokenizer, eos_id, to_tokenize):
                tokens_total[split] += len(tokens)
                if writers[split].write(tokens) is not None:
                    output.save_progress(writers)
            bar.update(len(batch))
            seconds = max(time.time() - start, 1e-9)
            bar.set_postfix_str(f"{sum(tokens_total.values()) / seconds:,.0f} tok/s", refresh=False)
        bar.close()
        check_kept_documents(report, documents_total, args.val_fraction)
        for s in SPLITS:
            writers[s].close()
    except BaseException:
        for w in writers.values():
            w.abort()
        output.discard_temporaries()
        raise
    manifest = text_manifest(run, report, split_counts, documents_total, tokens_total,
                             {s: w.finished for s, w in writers.items()}, time.time() - start)
    tok.save_beside(out)
    output.finish(manifest)
    if remote is not None:
        remote.publish(manifest)
    return manifest


def _check_totals(manifest: dict) -> None:
    for split, info in manifest["splits"].items():
        docs = sum(s["documents"] for s in info["shards"])
        tokens = sum(s["tokens"] for s in info["shards"])
        if (docs, tokens) != (info["documents"], info["tokens"]):
            raise ShardError(f"{split}: shards hold {docs} documents / {tokens} tokens but the corpus gave "
                             f"{info['documents']} / {info['tokens']}; the input changed since the finished shards "
                             "were written. Delete the output and run again.")


def _removed_text(summary: dict[str, int]) -> str:
    removed = ", ".join(f"{k.removeprefix('removed_')} {v}" for k, v in summary.items() if k.startswith("removed_"))
    return f"{summary['read']} read, kept {summary['kept']}, removed: {removed}"


def _progress_bar(quiet: bool):
    return tqdm(unit=" docs", disable=quiet, dynamic_ncols=True, file=sys.stderr)


def _print_examples(manifest: dict) -> None:
    ex = manifest["examples"]
    print(f"{manifest['example_format']} examples: {ex['read']} read, {ex['kept']} kept; longer than --seq-len "
          f"{manifest['seq_len']}: {ex['truncated']} truncated, {ex['dropped_too_long']} dropped "
          f"(--too-long {ex['too_long_policy']})")
    labels = manifest.get("labels")
    if labels is not None:
        print(f"labels ({len(labels)}, in class-id order): {', '.join(map(str, labels))}")
    for split, info in manifest["splits"].items():
        extra = ""
        if get_format(manifest["example_format"]).label_vocab == "token" and info["target_tokens"]:
            majority = max(info["label_counts"]) / info["target_tokens"]
            extra = f", {info['target_tokens']} tagged tokens, majority-tag baseline {majority:.3f}"
        elif labels is not None and info["documents"]:
            extra = _train_majority_text(manifest, info)
        elif "target_tokens" in info:
            extra = f", {info['target_tokens']} trained-on tokens"
        print(f"{split}: {info['documents']} examples, {info['tokens']} tokens{extra}, {len(info['shards'])} shards")


def _train_majority_text(manifest: dict, info: dict) -> str:
    """The accuracy on this split of always answering the training split's most frequent class: lmtrain eval's
    train-majority baseline (a split's own most frequent class would flatter it). Nothing when training is empty
    (an evaluation-only set) or when the split has no examples."""
    train_counts = manifest["splits"]["train"]["label_counts"]
    if not sum(train_counts) or not info["documents"]:
        return ""
    top = int(np.argmax(train_counts))  # the first of tied classes, as lmtrain eval picks it
    accuracy = info["label_counts"][top] / info["documents"]
    return (f", train-majority accuracy {accuracy:.3f} ({str(manifest['labels'][top])!r}, the training split's most "
            "frequent class)")


def is_disk_full(error: BaseException | None) -> bool:
    """An OSError ENOSPC/EDQUOT, or ArrayRecord's RuntimeError that carries its text, anywhere in the chain."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(error, OSError | RuntimeError) and any(
                text in str(error) for text in ("No space left on device", "Disk quota exceeded")):
            return True
        error = error.__cause__ or error.__context__
    return False


def _written(args: argparse.Namespace, manifest: dict) -> str:
    if manifest.get(KEPT):
        return f"kept the existing shards of {args.output}/{MANIFEST}: nothing was written"
    return f"wrote {args.output}/{MANIFEST} in {manifest['seconds']}s"


def main(argv: list[str] | None = None) -> int:
    try:
        load_plugins()  # first: a plugin's format is a choice of --format
    except ConfigError as e:
        print(f"shard_data: error: {e}", file=sys.stderr)
        return 2
    args = parse_args(argv)
    try:
        manifest = shard_corpus(args)
    except (SourceError, ConfigError) as e:
        print(f"shard_data: error: {e}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as e:
        if not is_disk_full(e):
            raise
        where = f"the staging directory of {args.output}" if is_remote(args.output) else args.output
        print(f"shard_data: error: the disk is full: writing shards to {where} failed. Free space (or choose another "
              "--output) and run the same command again: the shards finished so far are kept and reused.",
              file=sys.stderr)
        return 2
    if not get_format(manifest.get("example_format", "text")).from_corpus:
        _print_examples(manifest)
        print(_written(args, manifest))
        return 0
    print(f"cleaning: {_removed_text(manifest['cleaning'])}")
    long_docs = manifest["long_documents"]
    if long_docs["split"]:
        print(f"long documents: {long_docs['split']} longer than --max-doc-chars {long_docs['max_doc_chars']} were "
              f"split into {long_docs['pieces']} pieces")
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['documents']} documents, {info['tokens']} tokens, {len(info['shards'])} shards "
              f"({manifest['token_dtype']})")
    print(_written(args, manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
