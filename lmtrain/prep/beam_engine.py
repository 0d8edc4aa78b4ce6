"""shard_data --runner beam: the local engine's stages as an Apache Beam pipeline (lmtrain.prep.beam_stages),
run where --beam-options says (the DirectRunner here; Dataflow, Flink or Spark at scale), and published as the
local engine publishes (lmtrain.prep.beam_output): the same shards' content and the same manifest.

This process checks the options and inputs, runs the pipeline, then names the shards and writes the manifest
last. Record formats run two pipelines, as the local engine reads its records twice: the first checks every
record and gathers the labels (the class list needs all of them), the second encodes and writes.

shard_data imports this module for every run; apache_beam (the [beam] extra, seconds to import) is imported only
when a pipeline runs, so the base install runs the local engine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import shlex
import tempfile
import time
from collections import Counter
from typing import TYPE_CHECKING

from lmtrain.config import ConfigError
from lmtrain.data.examples import SourceError
from lmtrain.data.formats import get_format
from lmtrain.data.shard_files import SPLITS
from lmtrain.paths import as_path, is_remote
from lmtrain.prep import beam_stages
from lmtrain.prep import shard_data as sd
from lmtrain.prep.beam_output import BeamOutput, clear
from lmtrain.prep.cleaning import CleaningReport

if TYPE_CHECKING:
    from apache_beam.options.pipeline_options import PipelineOptions

BEAM_CONTEXT = re.compile(r" \[while running '[^']*'\]$")  # what Beam appends to a worker's error message
LABELS_STAGING = ".beam-labels"  # a gs:// output's staging of the first pass of a record format


def pipeline_options(args: argparse.Namespace) -> PipelineOptions:
    from apache_beam.options.pipeline_options import PipelineOptions

    try:
        flags = shlex.split(args.beam_options)
    except ValueError as e:
        raise ConfigError(f"--beam-options {args.beam_options!r}: {e}.") from None
    return PipelineOptions(flags)


def run_pipeline(args: argparse.Namespace, build, staging: str) -> dict:
    """Build and run one pipeline into a fresh staging prefix; its result (shards and counts)."""
    import apache_beam as beam

    clear(staging)
    as_path(staging).mkdir(parents=True, exist_ok=True)
    try:
        with _beam_logs_quiet(), beam.Pipeline(options=pipeline_options(args)) as p:
            build(p)
    except Exception as e:  # noqa: BLE001 - a runner wraps a worker's error; ours is found and raised as it was
        found = user_error(e)
        if found is None:
            raise
        raise found from None
    return json.loads((as_path(staging) / beam_stages.RESULT).read_text())


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


def user_error(error: BaseException) -> Exception | None:
    """The input error (SourceError, ConfigError) a worker raised, out of the runner's wrapping: the local
    engine's one-line error. A runner that ships only the text of a remote traceback gives its last line,
    'SourceError: message' (or ExampleError)."""
    seen = error
    while seen is not None:
        if isinstance(seen, SourceError | ConfigError):
            return type(seen)(BEAM_CONTEXT.sub("", str(seen)))
        seen = seen.__cause__ or seen.__context__
    for line in reversed(str(error).splitlines()):
        for kind in ("ExampleError", "SourceError"):
            marker = f"{kind}: "
            if marker in line:
                return SourceError(BEAM_CONTEXT.sub("", line.split(marker, 1)[1].strip()))
    return None


def shard_with_beam(args: argparse.Namespace) -> dict:
    """shard_data's pipeline on Beam; the manifest, as shard_corpus returns it."""
    if args.builtin_task or not get_format(args.format).from_corpus:
        return _shard_records(args)
    return _shard_text(args)


def _shard_text(args: argparse.Namespace) -> dict:
    run = sd.prepare_text(args)
    start = time.time()
    output = BeamOutput(args.output, run.fingerprint, SPLITS, args.force, args.staging_dir)
    if output.done is not None:
        return output.done
    with output.claimed():
        result = run_pipeline(args, lambda p: beam_stages.text_pipeline(p, run, output.staging), output.staging)
        stats = Counter(result["stats"])
        report = CleaningReport({k: stats[k] for k in ("read", "kept", *CleaningReport.RULES)})
        documents_total = {s: sum(i["entry"]["documents"] for i in result["shards"] if i["split"] == s)
                           for s in SPLITS}
        tokens_total = {s: sum(i["entry"]["tokens"] for i in result["shards"] if i["split"] == s) for s in SPLITS}
        sd.check_kept_documents(report, documents_total, args.val_fraction)
    shards = output.publish(result["shards"])
    manifest = sd.text_manifest(run, report, stats, documents_total, tokens_total, shards, time.time() - start)
    output.finish(run.tok, manifest)
    return manifest


def _shard_records(args: argparse.Namespace) -> dict:
    run = sd.prepare_task(args)
    start = time.time()
    found = _first_pass(args, run)
    labels = _labels(run, found["shards"], Counter(found["stats"]))
    fingerprint, options = sd.task_fingerprint(run, labels)
    output = BeamOutput(args.output, fingerprint, run.splits, args.force, args.staging_dir)
    if output.done is not None:
        return output.done
    with output.claimed():
        result = run_pipeline(args, lambda p: beam_stages.records_pipeline(p, args, run, labels, output.staging),
                              output.staging)
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
    shards = output.publish(result["shards"])
    manifest = sd.task_manifest(run, labels, fingerprint, options, totals, counts_targets, stats["read"], stats,
                                shards, time.time() - start)
    output.finish(run.tok, manifest)
    return manifest


def _first_pass(args: argparse.Namespace, run: sd.TaskRun) -> dict:
    """Check every record and summarise the labels, writing nothing into a local output (an input error leaves
    it as it was); a gs:// output's workers stage beside the output, as they must reach it."""
    if is_remote(args.output):
        staging = str(as_path(args.output) / LABELS_STAGING)
        try:
            return run_pipeline(args, lambda p: beam_stages.labels_pipeline(p, args, run, staging), staging)
        finally:
            clear(staging)
    with tempfile.TemporaryDirectory(prefix="lmtrain-beam-labels-") as staging:
        return run_pipeline(args, lambda p: beam_stages.labels_pipeline(p, args, run, staging), staging)


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

