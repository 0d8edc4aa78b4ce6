"""Measure shard_data's two engines on one corpus: the local engine (--workers N) against --runner beam on the
DirectRunner with N worker processes, both in the same run, as documents/s, tokens/s and their ratio.

    python tools/benchmark_beam.py --workdir /tmp/bench-beam --mb 200      # the built-in corpus repeated, no download

The corpus is the built-in one repeated to about --mb of text, written once as jsonl. Two settings are timed:
"dedup" (the defaults: cleaning, exact and near dedup; the copies are identical, so exact dedup keeps one and
every stage's shuffle runs over the whole corpus) and "no dedup" (--no-exact-dedup --no-near-dedup: every copy
is tokenized and written, so tokens/s measures tokenizing and shard writing).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lmtrain.data.builtin_corpus import builtin_documents  # noqa: E402
from lmtrain.prep import shard_data, train_tokenizer  # noqa: E402

SETTINGS = {"dedup": (), "no dedup": ("--no-exact-dedup", "--no-near-dedup")}


def dump_corpus(path: Path, mb: float, files: int) -> tuple[int, int]:
    """The built-in corpus repeated to about `mb` MB, over `files` jsonl files (the Beam engine reads files in
    parallel); (documents, bytes)."""
    docs = builtin_documents()
    lines = [json.dumps({"text": d}) + "\n" for d in docs]
    per_copy = sum(len(line.encode("utf-8")) for line in lines)
    copies = max(1, round(mb * 1e6 / per_copy))
    path.mkdir(parents=True, exist_ok=True)
    handles = [open(path / f"part-{i:03d}.jsonl", "w", encoding="utf-8") for i in range(files)]
    for c in range(copies):
        handles[c % files].writelines(lines)
    for f in handles:
        f.close()
    return copies * len(docs), copies * per_copy


def run_engine(engine: str, corpus: Path, tok: Path, out: Path, workers: int, extra: tuple[str, ...]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    beam = (f"--beam-options=--runner=DirectRunner --direct_num_workers={workers} "
            "--direct_running_mode=multi_processing")
    argv = ["--input", str(corpus / "*.jsonl"), "--tokenizer", str(tok), "--output", str(out), "--quiet",
            "--workers", str(workers), "--runner", engine, beam, *extra]
    start = time.perf_counter()
    assert shard_data.main(argv) == 0
    seconds = time.perf_counter() - start
    manifest = json.loads((out / "manifest.json").read_text())
    tokens = sum(s["tokens"] for s in manifest["splits"].values())
    return {"seconds": seconds, "read": manifest["cleaning"]["read"], "kept": manifest["cleaning"]["kept"],
            "tokens": tokens, "manifest": manifest}


def totals(manifest: dict) -> tuple:
    return manifest["cleaning"], {s: (i["documents"], i["tokens"]) for s, i in manifest["splits"].items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/lmtrain-bench-beam")
    p.add_argument("--mb", type=float, default=200, help="corpus size in MB of jsonl")
    p.add_argument("--files", type=int, default=8, help="jsonl files the corpus is split into")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated: " + ", ".join(SETTINGS))
    args = p.parse_args(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    tok = work / "tokenizer"
    if not tok.exists():
        assert train_tokenizer.main(["--builtin", "--vocab-size", "4096", "--max-chars", "3e6", "--output",
                                     str(tok)]) == 0
    corpus = work / "corpus"
    shutil.rmtree(corpus, ignore_errors=True)
    docs, size = dump_corpus(corpus, args.mb, args.files)
    print(f"corpus: {docs:,} documents, {size / 1e6:.1f} MB in {args.files} files; {args.workers} workers; "
          f"load {os.getloadavg()[0]:.2f}")
    for setting in args.settings.split(","):
        results = {e: run_engine(e, corpus, tok, work / f"out-{e}", args.workers, SETTINGS[setting])
                   for e in ("local", "beam")}
        local, beam = results["local"], results["beam"]
        same = totals(local["manifest"]) == totals(beam["manifest"])
        for engine, r in results.items():
            print(f"{setting:8s} {engine:5s}: {r['seconds']:7.1f} s, {r['read'] / r['seconds']:9,.0f} documents/s, "
                  f"{r['tokens'] / r['seconds']:11,.0f} tokens/s, {r['kept']:,} kept, {size / 1e6 / r['seconds']:.2f} MB/s")
        print(f"{setting:8s} beam/local throughput: {local['seconds'] / beam['seconds']:.2f}x; the same cleaning "
              f"counts and split totals: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
