"""`lmtrain serve` under load on this machine's accelerator (or CPU): a random GPT-2 of a named shape with a
tokenizer trained here on the built-in corpus, served on 127.0.0.1 and driven by `lmtrain bench-serve`'s client
at one concurrency. Prints and writes (--json) output tokens/s, requests/s and the p50/p95 of time to first token
and end-to-end latency. tools/device_check.sh runs it; tools/bench_serve_compare.py compares against a peer.

    python tools/benchmark_serve.py --shape gpt2_small --concurrency 16 --requests 64 --json serve.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from transformers import GPT2Config, GPT2LMHeadModel

from lmtrain.data.builtin_corpus import builtin_documents
from lmtrain.data.tokenizer import train_bpe_tokenizer
from lmtrain.serve import bench

REPO = pathlib.Path(__file__).resolve().parent.parent
# (layers, d_model, heads, positions): gpt2_small is GPT-2's 124M shape (with this tokenizer's vocabulary)
SHAPES = {"gpt2_small": (12, 768, 12, 1024), "tiny": (2, 64, 4, 256)}


def make_model(directory: pathlib.Path, shape: str, vocab_size: int) -> None:
    """A random GPT-2 of `shape` with a byte-level BPE tokenizer trained on the built-in corpus."""
    train_bpe_tokenizer(builtin_documents(max_docs=200), vocab_size, directory)
    vocab = len(json.loads((directory / "tokenizer.json").read_text())["model"]["vocab"])
    layers, d, heads, positions = SHAPES[shape]
    cfg = GPT2Config(vocab_size=vocab, n_layer=layers, n_embd=d, n_head=heads, n_positions=positions,
                     bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(cfg).save_pretrained(directory)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(proc: subprocess.Popen, url: str, timeout_s: float, log: pathlib.Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"lmtrain serve exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"lmtrain serve was not healthy after {timeout_s:.0f} s: {log.read_text()[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="gpt2_small")
    p.add_argument("--vocab-size", type=int, default=8192, help="the tokenizer trained for the model")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--start-timeout", type=float, default=300, help="seconds for the server to load and warm up")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="lmtrain-serve-bench-") as tmp:
        model_dir, log = pathlib.Path(tmp) / "model", pathlib.Path(tmp) / "serve.log"
        make_model(model_dir, args.shape, args.vocab_size)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "LMTRAIN_API_KEYS": ""}  # no keys: the server binds 127.0.0.1 only
        with log.open("w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "lmtrain.cli", "serve", str(model_dir), "--model-name", "m",
                                     "--port", str(port), "--max-batch", str(max(16, args.concurrency))],
                                    cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            t0 = time.monotonic()
            _wait_healthy(proc, url, args.start_timeout, log)
            start_s = time.monotonic() - t0
            client = bench.Client(url, None, 600)
            bench.run(client, "m", min(4, args.concurrency), 4, args.prompt_len, args.max_tokens)  # warm-up
            summary = bench.run(client, "m", args.concurrency, args.requests, args.prompt_len, args.max_tokens)
        finally:
            proc.terminate()
            proc.wait(timeout=120)
    result = {"shape": args.shape, "concurrency": args.concurrency, "requests": args.requests, "ok": summary["ok"],
              "failed": summary["failed"], "start_s": round(start_s, 1),
              "output_tokens_per_second": summary["output_tokens_per_second"],
              "requests_per_second": summary["requests_per_second"],
              "ttft_p50_s": summary["ttft_seconds"]["p50"], "ttft_p95_s": summary["ttft_seconds"]["p95"],
              "e2e_p50_s": summary["e2e_seconds"]["p50"], "e2e_p95_s": summary["e2e_seconds"]["p95"]}
    print(json.dumps(result, indent=1))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
