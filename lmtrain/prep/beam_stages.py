"""The Beam pipelines of shard_data --runner beam: the local engine's stages as transforms (run and published by
lmtrain.prep.beam_engine).

Every stage calls the local engine's own functions (lmtrain.prep.shard_data, cleaning, text_sources); what
differs is only how the whole-corpus decisions are made, each as a group-by instead of a walk in corpus order:

  read        one element per input file or range of TFDS records (one for a Hugging Face dataset, the built-in
              corpus or --max-docs), in parallel;
              every document carries its corpus position (file, document, piece), which stands in for order
  clean       the documents are Reshuffle'd over the workers, then cleaned one by one (clean_document)
  exact dedup group-by on the content hash (a combiner: one document per hash is held); the earliest survives
  near dedup  group-by on each LSH band key; a bucket yields its near-duplicate pairs, and the pairs, one list
              for the whole corpus, are walked in corpus order (cleaning.dropped_near_duplicates): the same
              survivors as the local Deduplicator
  split       by a hash of the cleaned text (split_of), or of the record's key (split_of_example)
  tokenize    in batches; the tokenizer is loaded once per worker (DoFn.setup)
  encode      record formats: the format's own encoder (make_encoder), as registered
  shard       group-by on (split, bucket of the position's hash), sized from the split's token total so a
              bucket holds about one shard; a bucket is written in corpus order, cut at --shard-mb
  publish     by the launching process, after the pipeline (beam_output): final names, the manifest last

apache_beam (the [beam] extra) is a heavy optional package: the stages are plain classes, made Beam DoFns and
CombineFns (beam_fn) when a pipeline is built, so importing this module (which shard_data does) imports no Beam
and the base install runs the local engine.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import uuid
from collections import Counter
from typing import TYPE_CHECKING

import xxhash

from lmtrain.data.formats import get_format
from lmtrain.data.shard_writer import ShardFileWriter
from lmtrain.paths import as_path
from lmtrain.prep import shard_data as sd
from lmtrain.prep.beam_output import shard_path, stage_shard
from lmtrain.prep.cleaning import (
    band_keys,
    clean_or_keep,
    dropped_near_duplicates,
    lsh_bands,
    near_duplicate,
    split_long_document,
)
from lmtrain.prep.text_sources import (
    CorpusSpec,
    corpus_from_args,
    expand_files,
    iter_documents,
    iter_records,
    iter_tfds_range,
    tfds_length,
)

if TYPE_CHECKING:
    import apache_beam as beam

RESULT = "result.json"  # the pipeline's shard list and counts, read back by the launching process
STATS = "stats"  # the tagged output of counts (Counters), summed over the corpus
FAIL_ONCE = "LMTRAIN_BEAM_FAIL_ONCE"  # test hook: a marker path; the first shard bundle to create it fails once
TFDS_RANGE = 10_000  # records of a TFDS split read by one worker
BUCKETS_PER_SHARD = 1.25  # buckets per shard's worth of tokens: a bucket averages 0.8 shard, rarely over one


# ----------------------------------------------------------------------------------------------- read


def read_units(spec: CorpusSpec) -> list[tuple[int, CorpusSpec, tuple[int, int] | None]]:
    """The parallel reads of a corpus, in corpus order: (index, spec, records start..stop or None). One per file;
    ranges of TFDS_RANGE records of a TFDS split (random access); a single read when --max-docs counts documents
    across them, or for a Hugging Face dataset (streamed) or the built-in corpus."""
    if spec.max_docs:
        return [(0, spec, None)]
    if spec.files:
        return [(i, dataclasses.replace(spec, files=(str(p),)), None) for i, p in enumerate(expand_files(spec.files))]
    if spec.tfds_name:
        n = tfds_length(spec)
        return [(i, spec, (start, min(start + TFDS_RANGE, n))) for i, start in enumerate(range(0, n, TFDS_RANGE))]
    return [(0, spec, None)]


def _tagged_stats(counts: Counter):
    import apache_beam as beam

    return beam.pvalue.TaggedOutput(STATS, counts)


@functools.cache
def beam_fn(stage: type) -> type:
    """A stage class as Beam runs it: a subclass of it and beam.CombineFn (a stage with accumulators) or
    beam.DoFn. The stage's own methods come first, so Beam calls them as if the stage derived from Beam's class;
    one class per stage, so every pipeline sees the same type."""
    import apache_beam as beam

    base = beam.CombineFn if hasattr(stage, "create_accumulator") else beam.DoFn
    return type(stage.__name__, (stage, base), {"__doc__": stage.__doc__})


def _bundle_stats(tag_counts: Counter):
    """A bundle's counts as one element of the STATS output (finish_bundle has no element to attach it to)."""
    import apache_beam as beam
    from apache_beam.transforms.window import GlobalWindow
    from apache_beam.utils.windowed_value import WindowedValue

    return beam.pvalue.TaggedOutput(STATS, WindowedValue(Counter(tag_counts), 0, [GlobalWindow()]))


class ReadDocuments:
    """(position, text) of every document of a read unit; a long document becomes pieces, as locally."""

    def __init__(self, max_doc_chars: int):
        self.max_doc_chars = max_doc_chars

    def process(self, unit: tuple[int, CorpusSpec, tuple[int, int] | None]):
        index, spec, span = unit
        counts: Counter = Counter()
        for number, doc in enumerate(iter_documents(spec) if span is None else iter_tfds_range(spec, *span)):
            pieces = split_long_document(doc, self.max_doc_chars)
            if len(pieces) > 1:
                counts["split_long"] += 1
                counts["split_long_pieces"] += len(pieces)
            for piece_index, piece in enumerate(pieces):
                yield (index, number, piece_index), piece
        yield _tagged_stats(counts)


class ReadRecords:
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
    return [(index, unit) for index, unit, _ in read_units(spec)]  # files, or one read


# ----------------------------------------------------------------------------------------------- clean, dedup


class Clean:
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


class FirstOccurrence:
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


class Decide:
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


class Tokenize:
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


class RecordLabels:
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


class LabelSummary:
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


class Encode:
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


class WriteShards:
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
                writer = ShardFileWriter(shard_path(self.staging, name), self.dtype, uuid.uuid4().hex[:12], fmt)
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
        return {"split": split, "bucket": bucket, "entry": stage_shard(writer, self.staging), "totals": totals,
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
    import apache_beam as beam

    split_tokens = (examples | "tokens per split" >> beam.Map(lambda e: (e[0], len(e[2]["tokens"])))
                    | "sum tokens" >> beam.CombinePerKey(sum))
    shards = (examples
              | "bucket" >> beam.Map(bucket_of, beam.pvalue.AsDict(split_tokens), dtype.itemsize, shard_bytes)
              | "group buckets" >> beam.GroupByKey()
              | "write shards" >> beam.ParDo(beam_fn(WriteShards)(staging, dtype, shard_bytes, format_name, labels))
              | "list shards" >> beam.combiners.ToList())
    stats = stats_parts | "all stats" >> beam.Flatten() | "sum stats" >> beam.CombineGlobally(sum_counts)
    pipeline = examples.pipeline
    _ = (pipeline | "result" >> beam.Create([None])
         | "write result" >> beam.Map(write_result, beam.pvalue.AsSingleton(shards), beam.pvalue.AsSingleton(stats),
                                      str(as_path(staging) / RESULT)))


# ----------------------------------------------------------------------------------------------- pipelines


def text_pipeline(p: beam.Pipeline, run: sd.TextRun, staging: str) -> None:
    import apache_beam as beam

    args, opts = run.args, run.opts
    read = (p | "units" >> beam.Create(read_units(run.spec))
            | "read" >> beam.ParDo(beam_fn(ReadDocuments)(args.max_doc_chars)).with_outputs(STATS, main="docs"))
    cleaned = (read.docs | "spread" >> beam.Reshuffle()
               | "clean" >> beam.ParDo(beam_fn(Clean)(opts)).with_outputs(STATS, main="docs"))
    if opts.exact_dedup:
        reps = (cleaned.docs | "by content hash" >> beam.Map(lambda d: (d[1].digest, d))
                | "first copy" >> beam.CombinePerKey(beam_fn(FirstOccurrence)()) | "drop hash" >> beam.Values())
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
    kept = reps | "decide" >> beam.ParDo(beam_fn(Decide)(), beam.pvalue.AsSingleton(dropped)).with_outputs(STATS, main="kept")
    examples = (kept.kept | "batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=max(1, args.batch_docs))
                | "tokenize" >> beam.ParDo(beam_fn(Tokenize)(args, run.dtype)))
    shard_bytes = max(1, int(args.shard_mb * 2**20))
    write_shards(examples, (read[STATS], cleaned[STATS], kept[STATS]), staging, run.dtype, shard_bytes, "text", None)


def labels_pipeline(p: beam.Pipeline, args: argparse.Namespace, run: sd.TaskRun, staging: str) -> None:
    import apache_beam as beam

    records = (p | "units" >> beam.Create(record_units(args, run)) | "read" >> beam.ParDo(beam_fn(ReadRecords)())
               | "spread" >> beam.Reshuffle())
    found = records | "check" >> beam.ParDo(beam_fn(RecordLabels)(worker_run(run))).with_outputs(STATS, main="labels")
    labels = found.labels | "per label" >> beam.CombinePerKey(beam_fn(LabelSummary)()) | "list labels" >> beam.combiners.ToList()
    stats = found[STATS] | "sum stats" >> beam.CombineGlobally(sum_counts)
    _ = (p | "result" >> beam.Create([None])
         | "write result" >> beam.Map(write_result, beam.pvalue.AsSingleton(labels), beam.pvalue.AsSingleton(stats),
                                      str(as_path(staging) / RESULT)))


def records_pipeline(p: beam.Pipeline, args: argparse.Namespace, run: sd.TaskRun, labels: list | None,
                     staging: str) -> None:
    import apache_beam as beam

    records = (p | "units" >> beam.Create(record_units(args, run)) | "read" >> beam.ParDo(beam_fn(ReadRecords)())
               | "spread" >> beam.Reshuffle())
    encoded = records | "encode" >> beam.ParDo(beam_fn(Encode)(worker_run(run), labels)).with_outputs(STATS, main="examples")
    shard_bytes = max(1, int(args.shard_mb * 2**20))
    write_shards(encoded.examples, (encoded[STATS],), staging, run.dtype, shard_bytes, run.example_format, labels)


def worker_run(run: sd.TaskRun) -> sd.TaskRun:
    """What a worker needs of the run (it loads the tokenizer and encoder itself, in setup)."""
    return dataclasses.replace(run, records=None, tok=None, encoder=None)
