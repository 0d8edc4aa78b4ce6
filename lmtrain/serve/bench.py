"""`lmtrain bench-serve`: load a running OpenAI-compatible server and measure it.

Launch:  lmtrain bench-serve http://127.0.0.1:8000 --concurrency 16 --requests 64 --prompt-len 32 --max-tokens 32

N clients send M streamed /v1/completions requests in all (greedy, ignore_eos, so every request generates
max-tokens tokens); the time to the first text and to the end of each are measured at the client. Prints
p50/p95/p99 of both, output tokens/s and requests/s, and writes bench_serve.json and bench_serve.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import os
import pathlib
import sys
import threading
import time
import urllib.parse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend
import numpy as np  # noqa: E402

WORDS = ("the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "house", "in", "park", "with", "big", "red")


class BenchError(ValueError):
    """A bench-serve setting that cannot work; the message says what to change."""


@dataclasses.dataclass
class Result:
    ok: bool
    ttft: float = float("nan")
    e2e: float = float("nan")
    tokens: int = 0
    error: str = ""


def prompt_text(index: int, length: int) -> str:
    """A deterministic prompt of `length` words (about as many tokens for a word-level or BPE tokenizer)."""
    return " ".join(WORDS[(index * 7 + i * 3) % len(WORDS)] for i in range(length))


class Client:
    def __init__(self, url: str, api_key: str | None, timeout: float):
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme != "http" or not parsed.hostname:
            raise BenchError(f"URL {url}: give an http://HOST:PORT address of the server.")
        self.host, self.port, self.base = parsed.hostname, parsed.port or 80, parsed.path.rstrip("/")
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout = timeout

    def model_id(self) -> str:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request("GET", f"{self.base}/v1/models", headers=self.headers)
            response = conn.getresponse()
            body = response.read()
            if response.status != 200:
                raise BenchError(f"GET /v1/models answered {response.status}: {body[:200]!r} (an API key missing?)")
            return json.loads(body)["data"][0]["id"]
        finally:
            conn.close()

    def complete(self, model: str, prompt: str, max_tokens: int) -> Result:
        body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                           "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}})
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        start = time.perf_counter()
        result = Result(ok=False)
        try:
            conn.request("POST", f"{self.base}/v1/completions", body=body, headers=self.headers)
            response = conn.getresponse()
            if response.status != 200:
                return Result(False, error=f"HTTP {response.status}: {response.read()[:200]!r}")
            chunks = 0
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    result.tokens = event["usage"]["completion_tokens"]
                if any(c.get("text") for c in event.get("choices", [])):
                    chunks += 1
                    if chunks == 1:
                        result.ttft = time.perf_counter() - start
            result.e2e = time.perf_counter() - start
            result.tokens = result.tokens or chunks
            result.ok = chunks > 0
            if not result.ok:
                result.error = "the stream carried no text"
        except (OSError, http.client.HTTPException, ValueError) as e:
            result.error = f"{type(e).__name__}: {e}"
        finally:
            conn.close()
        return result


def run(client: Client, model: str, concurrency: int, requests: int, prompt_len: int, max_tokens: int) -> dict:
    results: list[Result | None] = [None] * requests
    next_index = iter(range(requests))
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            results[i] = client.complete(model, prompt_text(i, prompt_len), max_tokens)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return summarize(results, wall, concurrency, prompt_len, max_tokens)


def summarize(results: list[Result], wall: float, concurrency: int, prompt_len: int, max_tokens: int) -> dict:
    good = [r for r in results if r.ok]
    ttft = np.asarray([r.ttft for r in good]) if good else np.asarray([np.nan])
    e2e = np.asarray([r.e2e for r in good]) if good else np.asarray([np.nan])

    def pct(x):
        return {f"p{q}": float(np.percentile(x, q)) for q in (50, 95, 99)}

    return {"concurrency": concurrency, "requests": len(results), "ok": len(good), "failed": len(results) - len(good),
            "errors": sorted({r.error for r in results if not r.ok})[:5], "prompt_len": prompt_len,
            "max_tokens": max_tokens, "wall_seconds": wall, "ttft_seconds": pct(ttft), "e2e_seconds": pct(e2e),
            "output_tokens": int(sum(r.tokens for r in good)),
            "output_tokens_per_second": sum(r.tokens for r in good) / wall, "requests_per_second": len(good) / wall,
            "ttft_all": ttft.tolist(), "e2e_all": e2e.tolist()}


def plot(summary: dict, path: pathlib.Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "ttft_all", "time to first token"), (axes[1], "e2e_all", "end-to-end latency")):
        values = np.asarray(summary[key]) * 1000
        ax.hist(values[np.isfinite(values)], bins=30)
        for q, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
            ax.axvline(summary[key.replace("_all", "_seconds")][q] * 1000, color="k", linestyle=style, label=q)
        ax.set(title=title, xlabel="ms", ylabel="requests")
        ax.legend()
    fig.suptitle(f"concurrency {summary['concurrency']}: {summary['output_tokens_per_second']:.1f} output tokens/s, "
                 f"{summary['requests_per_second']:.2f} requests/s")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def print_summary(s: dict) -> None:
    ms = lambda d: " ".join(f"{k} {v * 1000:.1f}" for k, v in d.items())  # noqa: E731
    print(f"requests: {s['ok']}/{s['requests']} ok at concurrency {s['concurrency']} in {s['wall_seconds']:.2f}s")
    print(f"time to first token (ms): {ms(s['ttft_seconds'])}")
    print(f"end-to-end latency (ms):  {ms(s['e2e_seconds'])}")
    print(f"output tokens/s: {s['output_tokens_per_second']:.1f}   requests/s: {s['requests_per_second']:.2f}")
    for error in s["errors"]:
        print(f"failed: {error}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lmtrain bench-serve", description="Measure an OpenAI-compatible server.")
    p.add_argument("url", help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=32, help="words per prompt")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--model", help="the model id (default: the first of /v1/models)")
    p.add_argument("--api-key", help="default: $LMTRAIN_API_KEY")
    p.add_argument("--out", default=".", help="directory for bench_serve.json and bench_serve.png")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        for name in ("concurrency", "requests", "prompt_len", "max_tokens"):
            if getattr(args, name) < 1:
                raise BenchError(f"--{name.replace('_', '-')} {getattr(args, name)}: give at least 1.")
        client = Client(args.url, args.api_key or os.environ.get("LMTRAIN_API_KEY"), args.timeout)
        model = args.model or client.model_id()
    except (BenchError, OSError) as e:
        print(f"lmtrain bench-serve: error: {e}", file=sys.stderr)
        return 2
    summary = run(client, model, args.concurrency, args.requests, args.prompt_len, args.max_tokens)
    summary.update(url=args.url, model=model)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_serve.json").write_text(json.dumps(summary, indent=1))
    plot(summary, out / "bench_serve.png")
    print_summary(summary)
    print(f"wrote {out / 'bench_serve.json'} and {out / 'bench_serve.png'}")
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
