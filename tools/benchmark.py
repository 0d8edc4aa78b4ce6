"""Benchmark the train step: tokens/s, step time, MFU and peak memory for a config.

    python tools/benchmark.py --config=gpt2_small --steps=20                 # on a GPU/TPU
    python tools/benchmark.py --config=gpt2_small:runlocal --torch           # CPU, against PyTorch GPT2LMHeadModel

With --torch, Hugging Face transformers' GPT2LMHeadModel of the same shape trains on the same
batches with torch.optim.AdamW in the same process, and the ratio of tokens/s is printed.
Random token batches are used, so the figures measure the step alone, not the data pipeline.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

from lmtrain.runtime import apply_xla_defaults

apply_xla_defaults()  # as `lmtrain train` does, before JAX starts

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from lmtrain import config as config_lib  # noqa: E402
from lmtrain.parallel.mesh import make_mesh  # noqa: E402
from lmtrain.parallel.partitioning import axis_rules, logical_to_spec  # noqa: E402
from lmtrain.train import metrics as metrics_lib  # noqa: E402
from lmtrain.train.state import create_sharded_state  # noqa: E402
from lmtrain.train.trainer import Components  # noqa: E402


def _batch(cfg, rng) -> dict:
    b, length, v = cfg.data.batch_size, cfg.data.seq_len, cfg.model.vocab_size
    tokens = rng.integers(0, v, (b, length + 1), dtype=np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((b, length), np.float32),
            "segment_ids": np.ones((b, length), np.int32),
            "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (b, length)).copy()}


def _peak_memory_bytes() -> tuple[str, int]:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return "device", int(stats["peak_bytes_in_use"])
    return "host RSS", int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def bench_lmtrain(cfg, steps: int, warmup: int, segments: bool) -> dict:
    mesh_shape = config_lib.validate(cfg, jax.device_count())
    mesh, rules = make_mesh(mesh_shape), cfg.mesh.axis_rules
    with cfg.unlocked():
        cfg.train.steps = max(cfg.train.steps, warmup + steps)
    parts = Components.from_config(cfg)
    model_def, tx = parts.model_def, parts.tx
    rng = np.random.default_rng(0)
    with axis_rules(mesh, rules):
        state, shardings, _ = create_sharded_state(model_def, tx, 0, mesh, rules, parts.plan)
        batch_sharding = NamedSharding(mesh, PartitionSpec(logical_to_spec(("batch",), rules, mesh)[0], None))
        step = jax.jit(parts.train_step, in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
                       donate_argnums=0)
        batches = []
        for _ in range(4):
            b = _batch(cfg, rng)
            if not segments:
                b.pop("segment_ids")
            batches.append(jax.device_put(b, batch_sharding))
        if not segments:
            step = _without_segments(parts.train_step, shardings, batch_sharding)
        t0 = time.perf_counter()
        state, m = step(state, batches[0])
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        for i in range(warmup):
            state, m = step(state, batches[i % 4])
        jax.block_until_ready(m)
        t0 = time.perf_counter()
        for i in range(steps):
            state, m = step(state, batches[i % 4])
        jax.block_until_ready(m)
        elapsed = time.perf_counter() - t0
    tokens = cfg.data.batch_size * cfg.data.seq_len * steps
    tok_s = tokens / elapsed
    flops = metrics_lib.flops_per_token(cfg.model, cfg.data.seq_len, metrics_lib.matmul_params(model_def))
    peak = metrics_lib.device_peak_flops()
    mem_kind, mem = _peak_memory_bytes()
    return {"impl": "lmtrain", "params_M": model_def.num_params() / 1e6, "tokens_per_s": tok_s,
            "step_ms": 1000 * elapsed / steps, "compile_s": compile_s, "final_loss": float(m["loss"]),
            "mfu": tok_s * flops / (peak * jax.device_count()) if peak else None,
            "tflops_per_s": tok_s * flops / 1e12, f"peak_mem_GiB ({mem_kind})": mem / 2**30}


def _without_segments(inner, shardings, batch_sharding):
    """The same step for batches without segment ids (plain causal attention, e.g. for the cuDNN kernel)."""

    def run(state, batch):
        return inner(state, {**batch, "segment_ids": None})

    return jax.jit(run, in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None), donate_argnums=0)


def bench_torch_gpt2(cfg, steps: int, warmup: int, threads: int) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(threads)
    m = cfg.model
    hf_cfg = GPT2Config(vocab_size=m.vocab_size, n_positions=m.max_seq_len, n_embd=m.d_model, n_layer=m.n_layers,
                        n_head=m.n_heads, n_inner=m.d_ff, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        tie_word_embeddings=True)
    model = GPT2LMHeadModel(hf_cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.lr, betas=(cfg.optimizer.b1, cfg.optimizer.b2),
                            weight_decay=cfg.optimizer.weight_decay)
    rng = np.random.default_rng(0)
    batches = [torch.from_numpy(_batch(cfg, rng)["inputs"].astype(np.int64)) for _ in range(4)]

    def one(i):
        ids = batches[i % 4]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.clip_norm or 1e9)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    for i in range(max(warmup, 1)):
        one(i)
    t0 = time.perf_counter()
    for i in range(steps):
        loss = one(i)
    elapsed = time.perf_counter() - t0
    tok_s = cfg.data.batch_size * cfg.data.seq_len * steps / elapsed
    return {"impl": f"torch {torch.__version__} GPT2LMHeadModel ({threads} threads)",
            "params_M": sum(p.numel() for p in model.parameters()) / 1e6, "tokens_per_s": tok_s,
            "step_ms": 1000 * elapsed / steps, "final_loss": loss}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="gpt2_small")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--torch", action="store_true", help="also train HF GPT2LMHeadModel (torch) of the same shape")
    p.add_argument("--torch-threads", type=int, default=0, help="torch threads (0: as many as JAX's CPU cores)")
    p.add_argument("--segments", action="store_true", help="pass segment ids (document masking) to attention")
    p.add_argument("--json", default="", help="append the results as JSON lines to this file")
    args, rest = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    cfg = config_lib.load_config(args.config)
    config_lib.apply_overrides(cfg, dict(r[len("--config."):].split("=", 1) for r in rest))
    dev = jax.devices()[0]
    print(f"device: {jax.device_count()} x {dev.device_kind} ({dev.platform}); config {args.config}; "
          f"batch {cfg.data.batch_size} x seq {cfg.data.seq_len}; compute {cfg.model.dtype}; "
          f"attention {cfg.model.attention_impl}; remat {cfg.model.remat}")
    results = [bench_lmtrain(cfg, args.steps, args.warmup, args.segments)]
    if args.torch:
        import os

        threads = args.torch_threads or os.cpu_count() or 1
        results.append(bench_torch_gpt2(cfg, args.steps, args.warmup, threads))
    for r in results:
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}))
    if args.torch:
        print(f"ratio lmtrain / torch tokens/s: {results[0]['tokens_per_s'] / results[1]['tokens_per_s']:.2f}x")
    if args.json:
        with open(args.json, "a") as f:
            for r in results:
                f.write(json.dumps({"config": args.config, **r}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
