"""Measure the data toolchain: shard_data.py tokenizing throughput against raw tokenizers encode_batch,
and the shard loader's batches/s and data wait against a train step.

    python tools/benchmark_data.py --workdir /tmp/bench            # builtin corpus, no download
    python tools/benchmark_data.py --workdir /tmp/bench --step-ms tiny=40 --step-ms gpt2_small=900

The step is simulated by sleeping (a jitted step releases the GIL the same way), so the figure
is the time `next()` blocks with the loader's prefetch thread running beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lmtrain.data.builtin_corpus import builtin_documents  # noqa: E402
from lmtrain.data.shards import ShardedTrainIterator  # noqa: E402
from lmtrain.prep import shard_data, train_tokenizer  # noqa: E402

SHAPES = {"tiny": (128, 16), "gpt2_small": (1024, 512)}  # (seq_len, global batch) of configs/tiny.py, gpt2_small.py


def dump_corpus(path: Path, copies: int) -> int:
    """The builtin corpus, `copies` times (distinct per copy so that dedup would keep them), as jsonl."""
    docs = builtin_documents()
    with open(path, "w", encoding="utf-8") as f:
        for c in range(copies):
            for d in docs:
                f.write(json.dumps({"text": f"[{c}] {d}"}) + "\n")
    return path.stat().st_size


def bench_tokenize(workdir: Path, copies: int, repeats: int) -> dict:
    """Raw encode_batch and the toolchain, interleaved `repeats` times. On a shared machine the load
    changes from run to run, so the ratio is taken within each adjacent pair and the median reported."""
    import shutil
    import statistics

    from tokenizers import Tokenizer

    corpus, tok = workdir / "corpus.jsonl", workdir / "tokenizer"
    size = dump_corpus(corpus, copies)
    if not tok.exists():
        train_tokenizer.main(["--input", str(corpus), "--vocab-size", "4096", "--max-chars", "3e6", "--output",
                              str(tok)])
    tokenizer = Tokenizer.from_file(str(tok / "tokenizer.json"))

    def raw() -> tuple[int, float]:
        start = time.perf_counter()  # reading the jsonl is counted, as the toolchain has to do it too
        texts = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8")]
        n = 0
        for i in range(0, len(texts), 512):
            n += sum(len(e.ids) for e in tokenizer.encode_batch(texts[i : i + 512], add_special_tokens=False))
        return n, time.perf_counter() - start

    def toolchain(flags: list[str]) -> tuple[int, float, dict]:
        out = workdir / "shards"
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        manifest = shard_data.shard_corpus(shard_data.parse_args(
            ["--input", str(corpus), "--tokenizer", str(tok), "--output", str(out), "--quiet", *flags]))
        return sum(s["tokens"] for s in manifest["splits"].values()), time.perf_counter() - start, manifest

    raw_rates, tool_rates = [], []
    for _ in range(repeats):
        n, t = raw()
        raw_rates.append(n / t)
        n, t, _ = toolchain(["--no-clean"])
        tool_rates.append(n / t)
    _, t, manifest = toolchain([])
    clean_on_mb_per_s = size / 2**20 / t
    shutil.copytree(workdir / "shards", workdir / "shards_clean_on", dirs_exist_ok=True)
    toolchain(["--no-clean"])  # leave the cleaning-off shards for the loader benchmark
    return {"corpus_mb": round(size / 2**20, 1), "documents": manifest["cleaning"]["read"], "repeats": repeats,
            "raw_encode_batch_tok_per_s_median": round(statistics.median(raw_rates)),
            "toolchain_clean_off_tok_per_s_median": round(statistics.median(tool_rates)),
            "ratio_clean_off_vs_raw_per_pair": [round(b / a, 3) for a, b in zip(raw_rates, tool_rates, strict=True)],
            "ratio_clean_off_vs_raw_median": round(statistics.median(b / a for a, b in zip(raw_rates, tool_rates,
                                                                                        strict=True)), 3),
            "toolchain_clean_on_input_mb_per_s": round(clean_on_mb_per_s, 2),
            "clean_on_report": manifest["cleaning"]}


def bench_loader(shards: Path, step_ms: dict[str, float], seconds: float) -> dict:
    result = {}
    for name, (seq_len, batch) in SHAPES.items():
        it = ShardedTrainIterator(shards, seq_len, batch, seed=0, prefetch=0)
        next(it)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            next(it)
            n += 1
        rate = n / (time.perf_counter() - start)
        entry = {"batches_per_s": round(rate, 1), "tokens_per_s": round(rate * batch * seq_len)}
        if name in step_ms:
            step = step_ms[name] / 1000
            it = ShardedTrainIterator(shards, seq_len, batch, seed=0, prefetch=4)
            next(it)
            waited, steps = 0.0, max(10, int(seconds / step))
            for _ in range(steps):
                t = time.perf_counter()
                next(it)
                waited += time.perf_counter() - t
                time.sleep(step)
            entry.update({"step_ms": step_ms[name], "data_wait_pct_of_step": round(100 * waited / (steps * step), 3)})
            it.close()
        result[name] = entry
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/lmtrain_bench")
    p.add_argument("--copies", type=int, default=4, help="copies of the builtin corpus to tokenize (~2 MB each)")
    p.add_argument("--step-ms", action="append", default=[], metavar="SHAPE=MS",
                   help="train step time to simulate, e.g. tiny=40 (shapes: tiny, gpt2_small)")
    p.add_argument("--seconds", type=float, default=5.0, help="time per loader measurement")
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs of raw and toolchain tokenizing")
    args = p.parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    report = {"machine": f"{os.cpu_count()} CPU cores", "tokenize": bench_tokenize(workdir, args.copies, args.repeats)}
    step_ms = {k: float(v) for k, v in (s.split("=") for s in args.step_ms)}
    report["loader"] = bench_loader(workdir / "shards", step_ms, args.seconds)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
