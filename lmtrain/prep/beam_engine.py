"""shard_data's stages as an Apache Beam pipeline (--runner beam): the same shards and manifest as the local
engine, on the DirectRunner here or on Dataflow, Flink or Spark (--beam-options).

Every stage calls the local engine's own functions (lmtrain.prep.shard_data, cleaning, text_sources); what
differs is only how the whole-corpus decisions are made, each as a group-by instead of a walk in corpus order:

  read        one element per input file (one for a dataset, the built-in corpus or --max-docs), in parallel;
              every document carries its corpus position (file, document, piece), which stands in for order
  clean       per document (clean_document), then Reshuffle'd over the workers
  exact dedup group-by on the content hash (a combiner: one document per hash is held); the earliest survives
  near dedup  group-by on each LSH band key; a bucket yields its near-duplicate pairs, and the pairs, one list
              for the whole corpus, are walked in corpus order (cleaning.dropped_near_duplicates): the same
              survivors as the local Deduplicator
  split       by a hash of the cleaned text (split_of), or of the record's key (split_of_example)
  tokenize    in batches; the tokenizer is loaded once per worker (DoFn.setup)
  encode      record formats: the format's own encoder (make_encoder), as registered
  shard       group-by on (split, bucket of the position's hash), sized from the split's token total so a
              bucket holds about one shard; a bucket is written in corpus order, cut at --shard-mb
  publish     by this process, after the pipeline: the staged shards get their final names, manifest last

Shards are written under OUTPUT/.beam-staging (a retried bundle rewrites its own files); a pipeline that
fails leaves no manifest, so nothing the trainer takes as finished, and a re-run starts the staging anew.
Record formats run two pipelines, as the local engine reads its records twice: the first checks every
record and gathers the labels (the class list needs all of them), the second encodes and writes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shlex
import shutil
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import apache_beam as beam
import xxhash
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from lmtrain.config import ConfigError
from lmtrain.data.examples import SourceError
from lmtrain.data.formats import get_format
from lmtrain.data.shard_files import SPLITS, shard_name
from lmtrain.data.shard_writer import ShardFileWriter, open_output, unlink_inside
from lmtrain.paths import as_path, is_remote
from lmtrain.prep import shard_data as sd
from lmtrain.prep.cleaning import (
    CleaningReport,
    band_keys,
    clean_or_keep,
    dropped_near_duplicates,
    lsh_bands,
    near_duplicate,
    split_long_document,
)
from lmtrain.prep.text_sources import CorpusSpec, corpus_from_args, expand_files, iter_documents, iter_records
from lmtrain.storage.atomic import fsync_dir

STAGING = ".beam-staging"  # inside the output: the pipeline's shards before they get their final names
RESULT = "result.json"  # the pipeline's shard list and counts, read back by the launching process
STATS = "stats"  # the tagged output of counts (Counters), summed over the corpus
FAIL_ONCE = "LMTRAIN_BEAM_FAIL_ONCE"  # test hook: a marker path; the first shard bundle to create it fails once
BUCKETS_PER_SHARD = 1.25  # buckets per shard's worth of tokens: a bucket averages 0.8 shard, rarely over one


# ----------------------------------------------------------------------------------------------- read


def read_units(spec: CorpusSpec) -> list[tuple[int, CorpusSpec]]:
    """The parallel reads of a corpus: one per file, in the local engine's file order; a single read when
    --max-docs counts documents across files, or for a dataset or the built-in corpus."""
    if spec.files and not spec.max_docs:
        return list(enumerate(dataclasses.replace(spec, files=(str(p),)) for p in expand_files(spec.files)))
    return [(0, spec)]


def _bundle_stats(tag_counts: Counter):
    """A bundle's counts as one element of the STATS output (finish_bundle has no element to attach it to)."""
    return beam.pvalue.TaggedOutput(STATS, WindowedValue(Counter(tag_counts), 0, [GlobalWindow()]))


class ReadDocuments(beam.DoFn):
    """(position, text) of every document of a read unit; a long document becomes pieces, as locally."""

    def __init__(self, max_doc_chars: int):
        self.max_doc_chars = max_doc_chars

    def process(self, unit: tuple[int, CorpusSpec]):
        index, spec = unit
        counts: Counter = Counter()
        for number, doc in enumerate(iter_documents(spec)):
            pieces = split_long_document(doc, self.max_doc_chars)
            if len(pieces) > 1:
                counts["split_long"] += 1
                counts["split_long_pieces"] += len(pieces)
            for piece_index, piece in enumerate(pieces):
                yield (index, number, piece_index), piece
        yield beam.pvalue.TaggedOutput(STATS, counts)


class ReadRecords(beam.DoFn):
    """(position, record, where) of every record of a read unit (or of the built-in task's records)."""

    def process(self, unit):
        index, source = unit
        records = iter_records(source) if isinstance(source, CorpusSpec) else iter(source)
        for number, (record, where) in enumerate(records):
            yield (index, number), record, where


def record_units(args: argparse.Namespace, run: sd.TaskRun):
    if args.builtin_task:
        return [(0, list(run.records()))]
    spec = corpus_from_args(args)
    units = read_units(spec)
    return units if spec.files or spec.hf_dataset else [(0, spec)]


# ----------------------------------------------------------------------------------------------- clean, dedup


class Clean(beam.DoFn):
    """clean_document per document; the documents a filter drops are only counted."""

    def __init__(self, opts):
        self.opts = opts

    def start_bundle(self):
        self.counts = Counter()

    def process(self, item):
        position, text = item
        self.counts["read"] += 1
        doc = clean_or_keep(text, self.opts)
        if doc.text is None:
            self.counts[doc.reason] += 1
            return
        yield position, doc

    def finish_bundle(self):
        yield _bundle_stats(self.counts)


class FirstOccurrence(beam.CombineFn):
    """Per content hash: the earliest document and how many copies there are (memory: one document)."""

    def create_accumulator(self):
        return None

    def add_input(self, acc, item):
        return self.merge_accumulators([acc, (item[0], item[1], 1)])

    def merge_accumulators(self, accs):
        best = None
        for acc in accs:
            if acc is None:
                continue
            if best is None:
                best = acc
            else:
                first = acc if acc[0] < best[0] else best
                best = (first[0], first[1], best[2] + acc[2])
        return best

    def extract_output(self, acc):
        position, doc, copies = acc
        return position, doc, copies - 1


def band_items(rep, bands: int, rows: int):
    position, doc, _ = rep
    for band, key in enumerate(band_keys(doc.signature, bands, rows)):
        yield (band, key), (position, doc.signature)


def bucket_edges(bucket, threshold: float):
    """The near-duplicate pairs (earlier, later) among the documents sharing one band key."""
    members = sorted(bucket[1], key=lambda m: m[0])
    for i, (a, sig_a) in enumerate(members):
        for b, sig_b in members[i + 1 :]:
            if near_duplicate(sig_a, sig_b, threshold):
                yield a, b


class Decide(beam.DoFn):
    """Keep a surviving document (with its copies counted as exact duplicates), or count it and its copies as
    near duplicates, as the local Deduplicator does: a copy of a dropped document is dropped for the same reason."""

    def start_bundle(self):
        self.counts = Counter()

    def process(self, rep, dropped):
        position, doc, copies = rep
        if position in dropped:
            self.counts["near_dup"] += 1 + copies
            return
        self.counts["kept"] += 1
        self.counts["exact_dup"] += copies
        yield position, doc.text

    def finish_bundle(self):
        yield _bundle_stats(self.counts)


# ----------------------------------------------------------------------------------------------- tokenize, encode


class Tokenize(beam.DoFn):
    """(split, position, arrays) of a batch of kept documents; the tokenizer is loaded once per worker."""

    def __init__(self, args: argparse.Namespace, dtype):
        self.args, self.dtype = args, dtype

    def setup(self):
        self.tok = sd.load_tokenizer(self.args.tokenizer, self.args.eos_token)
        self.tok.extend(self.args.add_special_tokens, None)

    def process(self, batch):
        docs = [(sd.split_of(text, self.args.val_fraction), text) for _, text in batch]
        tokens = sd.document_tokens(self.tok.backend, self.tok.eos_id, docs)
        for (position, _), (split, ids) in zip(batch, tokens, strict=True):
            yield split, position, {"tokens": ids.astype(self.dtype)}


class RecordLabels(beam.DoFn):
    """The first pass of a record format: check each record; (label, (position, where, in train)) of its labels."""

    def __init__(self, run: sd.TaskRun):
        self.run = run

    def setup(self):
        tok, encoder = sd.task_encoder(self.run.args, self.run.fmt)
        self.run = dataclasses.replace(self.run, tok=tok, encoder=encoder)

    def start_bundle(self):
        self.counts = Counter()

    def process(self, item):
        position, record, where = item
        self.counts["examples"] += 1
        self.counts["train_examples"] += self.run.split_of(record) == "train"
        for label, split, at in self.run.labels_found(record, where):
            yield label, (position, at, split == "train", split)

    def finish_bundle(self):
        yield _bundle_stats(self.counts)


class LabelSummary(beam.CombineFn):
    """Per label: where it is first seen, whether the training split has it, and the first record of each split
    that has it (the record an error about it names)."""

    def create_accumulator(self):
        return None

    def add_input(self, acc, item):
        position, where, in_train, split = item
        return self.merge_accumulators([acc, (position, where, in_train, {split: (position, where)})])

    def merge_accumulators(self, accs):
        best = None
        for acc in accs:
            if acc is None:
                continue
            if best is None:
                best = acc
                continue
            first = acc if acc[0] < best[0] else best
            by_split = dict(best[3])
            for split, at in acc[3].items():
                if split not in by_split or at[0] < by_split[split][0]:
                    by_split[split] = at
            best = (first[0], first[1], best[2] or acc[2], by_split)
        return best

    def extract_output(self, acc):
        return acc


class Encode(beam.DoFn):
    """(split, position, arrays) of each record, by the format's encoder; its truncated and dropped counts."""

    def __init__(self, run: sd.TaskRun, labels: list | None):
        self.run, self.labels = run, labels

    def setup(self):
        tok, encoder = sd.task_encoder(self.run.args, self.run.fmt)
        self.run = dataclasses.replace(self.run, tok=tok, encoder=encoder)
        self.label_ids = {str(v): i for i, v in enumerate(self.labels or [])}

    def start_bundle(self):
        self.before = Counter(self.run.encoder.counts)
        self.counts = Counter()

    def process(self, item):
        position, record, where = item
        self.counts["read"] += 1  # (every label was checked by the first pass)
        example = self.run.encoder.encode(record, where)
        if example is None:
            return
        yield self.run.split_of(record), position, self.run.fmt.arrays(example, self.label_ids)

    def finish_bundle(self):
        self.counts.update(Counter(self.run.encoder.counts) - self.before)
        yield _bundle_stats(self.counts)


# ----------------------------------------------------------------------------------------------- shards


def bucket_of(item, split_tokens: dict, itemsize: int, shard_bytes: int):
    """((split, bucket), (position, arrays)): about BUCKETS_PER_SHARD buckets per shard's worth of tokens."""
    split, position, arrays = item
    buckets = max(1, math.ceil(BUCKETS_PER_SHARD * split_tokens[split] * itemsize / shard_bytes))
    return (split, xxhash.xxh64_intdigest(repr(tuple(position)).encode()) % buckets), (position, arrays)


class WriteShards(beam.DoFn):
    """A bucket's examples in corpus order, as staged shards cut at shard_bytes; a retry rewrites the same files."""

    def __init__(self, staging: str, dtype, shard_bytes: int, format_name: str, labels: list | None):
        self.staging, self.dtype, self.shard_bytes = staging, dtype, shard_bytes
        self.format_name, self.labels = format_name, labels

    def process(self, group):
        (split, bucket), items = group
        fmt = get_format(self.format_name)
        items = sorted(items, key=lambda item: item[0])
        writer, totals, targets = None, None, False
        for position, arrays in items:
            if writer is None:
                name = f"{split}-b{bucket:05d}-{position_tag(position)}.array_record"
                writer = ShardFileWriter(Path(self.staging) / name, self.dtype, uuid.uuid4().hex[:12], fmt)
                totals = sd.new_task_totals((split,), self.labels)[split]
            writer.write(**arrays)
            _maybe_fail_once()
            targets = sd.count_example(totals, fmt, arrays) or targets
            if writer.token_bytes >= self.shard_bytes:
                yield self._finish(split, bucket, writer, totals, targets)
                writer = None
        if writer is not None:
            yield self._finish(split, bucket, writer, totals, targets)

    def _finish(self, split: str, bucket: int, writer: ShardFileWriter, totals: dict, targets: bool):
        return {"split": split, "bucket": bucket, "entry": writer.finish(), "totals": totals,
                "counts_targets": targets}


def position_tag(position) -> str:
    """A file name part that orders a bucket's shards by their first example's corpus position."""
    return "-".join(f"{p:08d}" for p in position)


def _maybe_fail_once() -> None:
    marker = os.environ.get(FAIL_ONCE)
    if marker:
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        raise RuntimeError(f"{FAIL_ONCE}: a worker failure injected once, mid-bundle (test hook)")


def sum_counts(counters) -> Counter:
    total: Counter = Counter()
    for c in counters:
        total.update(c)
    return total


def write_result(_, shards: list, stats: Counter, path: str) -> None:
    as_path(path).write_text(json.dumps({"shards": shards, "stats": dict(stats)}))


def write_shards(examples, stats_parts, staging: str, dtype, shard_bytes: int, format_name: str,
                 labels: list | None):
    """Shard writing and the result file, shared by text and record pipelines."""
    split_tokens = (examples | "tokens per split" >> beam.Map(lambda e: (e[0], len(e[2]["tokens"])))
                    | "sum tokens" >> beam.CombinePerKey(sum))
    shards = (examples
              | "bucket" >> beam.Map(bucket_of, beam.pvalue.AsDict(split_tokens), dtype.itemsize, shard_bytes)
              | "group buckets" >> beam.GroupByKey()
              | "write shards" >> beam.ParDo(WriteShards(staging, dtype, shard_bytes, format_name, labels))
              | "list shards" >> beam.combiners.ToList())
    stats = stats_parts | "all stats" >> beam.Flatten() | "sum stats" >> beam.CombineGlobally(sum_counts)
    pipeline = examples.pipeline
    _ = (pipeline | "result" >> beam.Create([None])
         | "write result" >> beam.Map(write_result, beam.pvalue.AsSingleton(shards), beam.pvalue.AsSingleton(stats),
                                      str(as_path(staging) / RESULT)))


# ----------------------------------------------------------------------------------------------- pipelines


def text_pipeline(p: beam.Pipeline, run: sd.TextRun, staging: str) -> None:
    args, opts = run.args, run.opts
    read = (p | "units" >> beam.Create(read_units(run.spec))
            | "read" >> beam.ParDo(ReadDocuments(args.max_doc_chars)).with_outputs(STATS, main="docs"))
    cleaned = (read.docs | "spread" >> beam.Reshuffle()
               | "clean" >> beam.ParDo(Clean(opts)).with_outputs(STATS, main="docs"))
    if opts.exact_dedup:
        reps = (cleaned.docs | "by content hash" >> beam.Map(lambda d: (d[1].digest, d))
                | "first copy" >> beam.CombinePerKey(FirstOccurrence()) | "drop hash" >> beam.Values())
    else:
        reps = cleaned.docs | "no copies" >> beam.Map(lambda d: (d[0], d[1], 0))
    if opts.near_dedup:
        bands, rows = lsh_bands(opts.num_perm, opts.near_dup_threshold)
        dropped = (reps | "band keys" >> beam.FlatMap(band_items, bands, rows)
                   | "group bands" >> beam.GroupByKey()
                   | "near pairs" >> beam.FlatMap(bucket_edges, opts.near_dup_threshold)
                   | "distinct pairs" >> beam.Distinct()
                   | "all pairs" >> beam.combiners.ToList()
                   | "survivors" >> beam.Map(dropped_near_duplicates))
    else:
        dropped = p | "none dropped" >> beam.Create([set()])
    kept = reps | "decide" >> beam.ParDo(Decide(), beam.pvalue.AsSingleton(dropped)).with_outputs(STATS, main="kept")
    examples = (kept.kept | "batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=max(1, args.batch_docs))
                | "tokenize" >> beam.ParDo(Tokenize(args, run.dtype)))
    shard_bytes = max(1, int(args.shard_mb * 2**20))
    write_shards(examples, (read[STATS], cleaned[STATS], kept[STATS]), staging, run.dtype, shard_bytes, "text", None)


def labels_pipeline(p: beam.Pipeline, args: argparse.Namespace, run: sd.TaskRun, staging: str) -> None:
    records = (p | "units" >> beam.Create(record_units(args, run)) | "read" >> beam.ParDo(ReadRecords())
               | "spread" >> beam.Reshuffle())
    found = records | "check" >> beam.ParDo(RecordLabels(worker_run(run))).with_outputs(STATS, main="labels")
    labels = found.labels | "per label" >> beam.CombinePerKey(LabelSummary()) | "list labels" >> beam.combiners.ToList()
    stats = found[STATS] | "sum stats" >> beam.CombineGlobally(sum_counts)
    _ = (p | "result" >> beam.Create([None])
         | "write result" >> beam.Map(write_result, beam.pvalue.AsSingleton(labels), beam.pvalue.AsSingleton(stats),
                                      str(as_path(staging) / RESULT)))


def records_pipeline(p: beam.Pipeline, args: argparse.Namespace, run: sd.TaskRun, labels: list | None,
                     staging: str) -> None:
    records = (p | "units" >> beam.Create(record_units(args, run)) | "read" >> beam.ParDo(ReadRecords())
               | "spread" >> beam.Reshuffle())
    encoded = records | "encode" >> beam.ParDo(Encode(worker_run(run), labels)).with_outputs(STATS, main="examples")
    shard_bytes = max(1, int(args.shard_mb * 2**20))
    write_shards(encoded.examples, (encoded[STATS],), staging, run.dtype, shard_bytes, run.example_format, labels)


def worker_run(run: sd.TaskRun) -> sd.TaskRun:
    """What a worker needs of the run (it loads the tokenizer and encoder itself, in setup)."""
    return dataclasses.replace(run, records=None, tok=None, encoder=None)


# ----------------------------------------------------------------------------------------------- run, publish


def pipeline_options(args: argparse.Namespace) -> PipelineOptions:
    try:
        flags = shlex.split(args.beam_options)
    except ValueError as e:
        raise ConfigError(f"--beam-options {args.beam_options!r}: {e}.") from None
    return PipelineOptions(flags)


def run_pipeline(args: argparse.Namespace, build, staging: str) -> dict:
    """Build and run one pipeline into a fresh staging prefix; its result file."""
    _clear(staging)
    as_path(staging).mkdir(parents=True, exist_ok=True)
    try:
        with beam.Pipeline(options=pipeline_options(args)) as p, _beam_logs_quiet():
            build(p)
    except Exception as e:  # noqa: BLE001 - a runner wraps a worker's error; ours is found and raised as it was
        found = user_error(e)
        if found is None:
            raise
        raise found from None
    return json.loads((as_path(staging) / RESULT).read_text())


@contextlib.contextmanager
def _beam_logs_quiet():
    """Beam logs a failed bundle's traceback before it raises; the error is reported once, by shard_data (a
    user's mistake as one line, anything else with its traceback)."""
    logger = logging.getLogger("apache_beam")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


BEAM_CONTEXT = re.compile(r" \[while running '[^']*'\]$")  # what Beam appends to a worker's error message


def user_error(error: BaseException) -> Exception | None:
    """The input error (SourceError, ConfigError) a worker raised, out of the runner's wrapping: the same
    one-line error as the local engine's. A runner that ships only the text of a remote traceback gives
    its last line, 'SourceError: message' (or ExampleError)."""
    seen = error
    while seen is not None:
        if isinstance(seen, SourceError | ConfigError):
            return type(seen)(BEAM_CONTEXT.sub("", str(seen)))
        seen = seen.__cause__ or seen.__context__
    for line in reversed(str(error).splitlines()):
        for kind in ("ExampleError", "SourceError", "ShardError"):
            marker = f"{kind}: "
            if marker in line:
                return SourceError(BEAM_CONTEXT.sub("", line.split(marker, 1)[1].strip()))
    return None


def _clear(staging: str) -> None:
    path = as_path(staging)
    if path.exists():
        path.rmtree()


def publish(out: Path, staging: str, shards: list[dict], splits: tuple[str, ...]) -> dict[str, list[dict]]:
    """Give the staged shards their final names, split by split in (bucket, corpus position) order."""
    finished: dict[str, list[dict]] = {s: [] for s in splits}
    for item in sorted(shards, key=lambda s: (s["split"], s["bucket"], s["entry"]["file"])):
        split = item["split"]
        entry = dict(item["entry"], file=shard_name(split, len(finished[split])))
        os.replace(Path(staging) / item["entry"]["file"], out / entry["file"])
        finished[split].append(entry)
    fsync_dir(out)
    return finished


def shard_with_beam(args: argparse.Namespace) -> dict:
    """shard_data's pipeline on Beam; the manifest, as shard_corpus returns it."""
    if is_remote(args.output):
        raise SourceError("--runner beam writes to a local or mounted --output for now; for gs:// run the local "
                          "engine, or write to a mounted bucket path.")
    if args.builtin_task or not get_format(args.format).from_corpus:
        return _shard_records(args)
    return _shard_text(args)


def _shard_text(args: argparse.Namespace) -> dict:
    run = sd.prepare_text(args)
    start = time.time()
    _, output, done = open_output(args.output, run.fingerprint, SPLITS, args.force, args.staging_dir)
    if done is not None:
        return done
    staging = str(output.out / STAGING)
    with restored_on_input_error(output, staging):
        result = run_pipeline(args, lambda p: text_pipeline(p, run, staging), staging)
        stats = Counter(result["stats"])
        report = CleaningReport({k: stats[k] for k in ("read", "kept", *CleaningReport.RULES)})
        documents_total = {s: sum(i["entry"]["documents"] for i in result["shards"] if i["split"] == s)
                           for s in SPLITS}
        tokens_total = {s: sum(i["entry"]["tokens"] for i in result["shards"] if i["split"] == s) for s in SPLITS}
        sd.check_kept_documents(report, documents_total, args.val_fraction)
    shards = publish(output.out, staging, result["shards"], SPLITS)
    manifest = sd.text_manifest(run, report, stats, documents_total, tokens_total, shards, time.time() - start)
    return _finish(output, run.tok, manifest, staging)


def _shard_records(args: argparse.Namespace) -> dict:
    run = sd.prepare_task(args)
    start = time.time()
    staging_root = Path(tempfile.mkdtemp(prefix="lmtrain-beam-labels-"))
    try:  # the first pass writes nothing into the output: an input error leaves it as it was
        found = run_pipeline(args, lambda p: labels_pipeline(p, args, run, str(staging_root)), str(staging_root))
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)
    stats = Counter(found["stats"])
    labels = _labels(run, found["shards"], stats)
    fingerprint, options = sd.task_fingerprint(run, labels)
    _, output, done = open_output(args.output, fingerprint, run.splits, args.force, args.staging_dir)
    if done is not None:
        return done
    staging = str(output.out / STAGING)
    with restored_on_input_error(output, staging):
        result = run_pipeline(args, lambda p: records_pipeline(p, args, run, labels, staging), staging)
        totals = sd.new_task_totals(run.splits, labels)
        counts_targets = False
        for item in result["shards"]:
            info, part = totals[item["split"]], item["totals"]
            for key in ("documents", "tokens", "target_tokens"):
                info[key] += part[key]
            info["label_counts"] = [a + b for a, b in zip(info["label_counts"], part["label_counts"], strict=True)]
            counts_targets = counts_targets or item["counts_targets"]
        stats = Counter(result["stats"])
        sd.check_kept_examples(totals, stats["read"], run.val, run.test)
    shards = publish(output.out, staging, result["shards"], run.splits)
    manifest = sd.task_manifest(run, labels, fingerprint, options, totals, counts_targets, stats["read"], stats,
                                shards, time.time() - start)
    return _finish(output, run.tok, manifest, staging)


def _labels(run: sd.TaskRun, summaries: list, stats: Counter) -> list | None:
    """The first pass's decisions, from its per-label summaries: the same checks, in the same order, as locally."""
    sd.check_eval_only_classes(run.args, run.fmt, run.val, run.test)
    sd.check_has_train(stats["train_examples"] > 0, stats["examples"], run.val, run.test)
    if not run.fmt.label_vocab:
        return None
    where_first = {label: where for label, (_, where, _, _) in summaries}
    train_labels = {label for label, (_, _, in_train, _) in summaries if in_train}
    labels, origin = sd.class_labels(run.args, train_labels, where_first.__getitem__, run.val, run.test)
    for label, (_, _, _, by_split) in sorted(summaries, key=lambda s: s[1][0]):
        for split, (_, where) in sorted(by_split.items(), key=lambda s: s[1][0]):
            sd.check_label(label, split, where, labels, origin)
    return labels


@contextlib.contextmanager
def restored_on_input_error(output, staging: str):
    """Claim the output for the pipeline; on an input error, leave it as it was (as the local engine does,
    which finds such errors before its first file): a directory this run made is removed again."""
    existed = output.out.exists()
    before = set(output.out.iterdir()) if existed else set()
    output.claim()  # the directory is this run's (or an earlier run's of the same inputs) from here on
    try:
        yield
    except (SourceError, ConfigError):
        _clear(staging)
        if not existed:
            shutil.rmtree(output.out, ignore_errors=True)
        elif not before:
            for path in output.out.iterdir():
                unlink_inside(output.out, path)
        raise


def _finish(output, tok, manifest: dict, staging: str) -> dict:
    tok.save_beside(output.out)
    output.finish(manifest)  # the manifest last: only now is the directory finished
    _clear(staging)
    return manifest
