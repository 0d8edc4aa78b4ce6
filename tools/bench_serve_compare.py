"""`lmtrain serve` against a plain peer (tools/serve_peer_transformers.py: transformers `generate`, one request at
a time) on the same model directory and prompts, with `lmtrain bench-serve`'s client, at several concurrencies.

Run:  python tools/bench_serve_compare.py HF_DIR --requests 48 --max-tokens 32 --prompt-len 16 --out bench_out
Prints, per concurrency, both servers' output tokens/s and p95 time to first token, and their ratio; writes
compare.json (and each run's bench_serve.json/png) under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.request

from lmtrain.serve import bench

REPO = pathlib.Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(argv: list[str], url: str, log: pathlib.Path, ready_path: str) -> subprocess.Popen:
    proc = subprocess.Popen(argv, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "LMTRAIN_API_KEYS": ""})
    for _ in range(1200):
        if proc.poll() is not None:
            raise SystemExit(f"{argv[:4]} exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + ready_path, timeout=5) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"{argv[:4]} did not start")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--out", default="bench_serve_compare")
    args = p.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    servers = {
        "lmtrain": ([sys.executable, "-m", "lmtrain.cli", "serve", args.model_dir, "--model-name", "m"], "/health"),
        "peer": ([sys.executable, str(REPO / "tools/serve_peer_transformers.py"), args.model_dir, "--name", "m"],
                 "/v1/models"),
    }
    results: dict = {"load_average": os.getloadavg(), "args": vars(args)}
    for name, (argv, ready) in servers.items():
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        proc = _start([*argv, "--port", str(port)], url, out / f"{name}.log", ready)
        try:
            client = bench.Client(url, None, 600)
            bench.run(client, "m", 2, 4, args.prompt_len, args.max_tokens)  # warm the peer's torch paths too
            for c in args.concurrency:
                summary = bench.run(client, "m", c, args.requests, args.prompt_len, args.max_tokens)
                run_dir = out / f"{name}_c{c}"
                run_dir.mkdir(exist_ok=True)
                (run_dir / "bench_serve.json").write_text(json.dumps(summary, indent=1))
                bench.plot(summary, run_dir / "bench_serve.png")
                results[f"{name}_c{c}"] = {k: summary[k] for k in ("ok", "failed", "output_tokens_per_second",
                                                                     "requests_per_second", "ttft_seconds",
                                                                     "e2e_seconds")}
                print(f"{name} c={c}: {summary['output_tokens_per_second']:.1f} tok/s, p95 TTFT "
                      f"{summary['ttft_seconds']['p95'] * 1000:.0f} ms, p95 e2e {summary['e2e_seconds']['p95'] * 1000:.0f}"
                      f" ms ({summary['ok']}/{summary['requests']} ok)", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=120)
    print("\n| concurrency | lmtrain tok/s | peer tok/s | ratio | lmtrain p95 TTFT | peer p95 TTFT |")
    print("|---|---|---|---|---|---|")
    for c in args.concurrency:
        a, b = results[f"lmtrain_c{c}"], results[f"peer_c{c}"]
        ratio = a["output_tokens_per_second"] / b["output_tokens_per_second"]
        results[f"ratio_c{c}"] = ratio
        print(f"| {c} | {a['output_tokens_per_second']:.0f} | {b['output_tokens_per_second']:.0f} | {ratio:.2f}x | "
              f"{a['ttft_seconds']['p95'] * 1000:.0f} ms | {b['ttft_seconds']['p95'] * 1000:.0f} ms |")
    results["load_average_after"] = os.getloadavg()
    (out / "compare.json").write_text(json.dumps(results, indent=1))
    print(f"load average before/after: {results['load_average']} / {results['load_average_after']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
