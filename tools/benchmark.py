"""Benchmark the train step: tokens/s, step time, MFU and peak memory for a config.

    python tools/benchmark.py --config=gpt2_small --steps=20                 # on a GPU/TPU
    python tools/benchmark.py --config=gpt2_small:runlocal --torch           # CPU, against PyTorch GPT2LMHeadModel
    python tools/benchmark.py --config=gpt2_small --torch-gpt --torch --rounds=5 --steps=10 \
        --config.model.n_layers=4 --config.model.d_model=256 --config.model.n_heads=4 --config.model.n_kv_heads=4 \
        --config.model.d_ff=1024 --config.model.vocab_size=8192 --config.model.max_seq_len=256 \
        --config.data.seq_len=256 --config.data.batch_size=8 --config.train.grad_accum=1 \
        --config.model.dtype=float32 --config.model.logits_dtype=float32   # the CPU comparison in BENCHMARKS.md

With --torch, Hugging Face transformers' GPT2LMHeadModel of the same shape trains on the same
batches with torch.optim.AdamW in the same process; with --torch-gpt, a plain PyTorch GPT written here
(fused QKV projection, torch.nn.functional.scaled_dot_product_attention, tied head: the nanoGPT recipe)
does. Both use AdamW and global-norm clipping, like lmtrain's step. With --rounds=N the contestants
are measured in turn N times (lmtrain, torch, lmtrain, ...) so that a change in the machine's load
hits all of them; medians and the median of the per-round ratios are printed.
Random token batches are used, so the figures measure the step alone, not the data pipeline.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
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


class LmtrainRunner:
    """lmtrain's jitted train step (the trainer's own), compiled and warmed up on construction."""

    def __init__(self, cfg, warmup: int, segments: bool, peak_flops: float | None = None):
        self.cfg = cfg
        self.peak_flops = peak_flops or metrics_lib.device_peak_flops()
        mesh_shape = config_lib.validate(cfg, jax.device_count())
        self.mesh, self.rules = make_mesh(mesh_shape), cfg.mesh.axis_rules
        parts = Components.from_config(cfg)
        self.model_def = parts.model_def
        rng = np.random.default_rng(0)
        with axis_rules(self.mesh, self.rules):
            self.state, shardings, _ = create_sharded_state(parts.model_def, parts.tx, 0, self.mesh, self.rules, parts.plan)
            batch_sharding = NamedSharding(self.mesh, PartitionSpec(logical_to_spec(("batch",), self.rules, self.mesh)[0], None))
            self.batches = []
            for _ in range(4):
                b = _batch(cfg, rng)
                if not segments:
                    b.pop("segment_ids")
                self.batches.append(jax.device_put(b, batch_sharding))
            if segments:
                self.step = jax.jit(parts.train_step, in_shardings=(shardings, batch_sharding),
                                    out_shardings=(shardings, None), donate_argnums=0)
            else:
                self.step = _without_segments(parts.train_step, shardings, batch_sharding)
            t0 = time.perf_counter()
            self.state, m = self.step(self.state, self.batches[0])
            jax.block_until_ready(m)
            self.compile_s = time.perf_counter() - t0
            self.run(warmup)
        self.name = "lmtrain"

    def run(self, steps: int) -> float:
        """Seconds for `steps` steps, waited for."""
        t0 = time.perf_counter()
        with axis_rules(self.mesh, self.rules):
            m = None
            for i in range(steps):
                self.state, m = self.step(self.state, self.batches[i % 4])
            jax.block_until_ready(m)
        self.last_loss = float(m["loss"]) if m is not None else float("nan")
        return time.perf_counter() - t0

    def summary(self, tok_s: float, step_s: float) -> dict:
        cfg = self.cfg
        flops = metrics_lib.flops_per_token(cfg.model, cfg.data.seq_len, metrics_lib.matmul_params(self.model_def))
        peak = self.peak_flops
        mem_kind, mem = _peak_memory_bytes()
        return {"impl": "lmtrain", "params_M": self.model_def.num_params() / 1e6, "tokens_per_s": tok_s,
                "step_ms": 1000 * step_s, "compile_s": self.compile_s, "final_loss": self.last_loss,
                "mfu": tok_s * flops / (peak * jax.device_count()) if peak else None,
                "peak_tflops": peak / 1e12 if peak else None,
                "tflops_per_s": tok_s * flops / 1e12, f"peak_mem_GiB ({mem_kind})": mem / 2**30}


def _without_segments(inner, shardings, batch_sharding):
    """The same step for batches without segment ids (plain causal attention, e.g. for the cuDNN kernel)."""

    def run(state, batch):
        return inner(state, {**batch, "segment_ids": None})

    return jax.jit(run, in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None), donate_argnums=0)


def _torch_gpt(cfg):
    """A plain GPT in PyTorch, the shape of lmtrain's GPT-2 family: learned positions, pre-LayerNorm blocks
    with one fused QKV projection and torch's scaled_dot_product_attention (causal), a tanh-GELU MLP, a
    final LayerNorm and a head tied to the token embedding."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    m = cfg.model
    d, n_heads = m.d_model, m.n_heads

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.fc, self.fc_out = nn.Linear(d, m.d_ff), nn.Linear(m.d_ff, d)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
            q, k, v = (y.view(b, t, n_heads, d // n_heads).transpose(1, 2) for y in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
            return x + self.fc_out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(m.vocab_size, d), nn.Embedding(m.max_seq_len, d)
            self.blocks = nn.ModuleList(Block() for _ in range(m.n_layers))
            self.ln_f = nn.LayerNorm(d)
            for p in self.parameters():
                if p.dim() == 2:
                    nn.init.normal_(p, std=m.init_std)

        def forward(self, ids, targets):
            x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))
            for block in self.blocks:
                x = block(x)
            logits = self.ln_f(x) @ self.wte.weight.T
            return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))

    return GPT()


class TorchRunner:
    """A PyTorch model trained with AdamW (decay on matrices only) and global-norm clipping, on CPU."""

    def __init__(self, cfg, kind: str, warmup: int, threads: int):
        import torch

        torch.set_num_threads(threads)
        torch.manual_seed(0)
        m, o = cfg.model, cfg.optimizer
        if kind == "hf":
            from transformers import GPT2Config, GPT2LMHeadModel

            hf_cfg = GPT2Config(vocab_size=m.vocab_size, n_positions=m.max_seq_len, n_embd=m.d_model, n_layer=m.n_layers,
                                n_head=m.n_heads, n_inner=m.d_ff, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                tie_word_embeddings=True)
            self.model = GPT2LMHeadModel(hf_cfg).train()
            self.loss = lambda ids, tgt: self.model(input_ids=ids, labels=ids).loss
            self.name = f"torch {torch.__version__} GPT2LMHeadModel ({threads} threads)"
        else:
            self.model = _torch_gpt(cfg).train()
            self.loss = self.model
            self.name = f"torch {torch.__version__} plain GPT, SDPA ({threads} threads)"
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": o.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW(groups, lr=o.lr, betas=(o.b1, o.b2))
        self.clip = o.clip_norm or 1e9
        rng = np.random.default_rng(0)
        self.batches = []
        for _ in range(4):
            b = _batch(cfg, rng)
            self.batches.append((torch.from_numpy(b["inputs"].astype(np.int64)), torch.from_numpy(b["targets"].astype(np.int64))))
        self.run(max(warmup, 1))

    def run(self, steps: int) -> float:
        import torch

        t0 = time.perf_counter()
        for i in range(steps):
            ids, tgt = self.batches[i % 4]
            loss = self.loss(ids, tgt)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        self.last_loss = loss.item()
        return time.perf_counter() - t0

    def summary(self, tok_s: float, step_s: float) -> dict:
        return {"impl": self.name, "params_M": sum(p.numel() for p in self.model.parameters()) / 1e6,
                "tokens_per_s": tok_s, "step_ms": 1000 * step_s, "final_loss": self.last_loss}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="gpt2_small")
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1, help="measurements per contestant, taken in turn")
    p.add_argument("--torch", action="store_true", help="also train HF GPT2LMHeadModel (torch) of the same shape")
    p.add_argument("--torch-gpt", action="store_true", help="also train a plain PyTorch GPT with SDPA (nanoGPT's recipe)")
    p.add_argument("--torch-threads", type=int, default=0, help="torch threads (0: as many as the machine's cores)")
    p.add_argument("--segments", action="store_true", help="pass segment ids (document masking) to attention")
    p.add_argument("--json", default="", help="append the results as JSON lines to this file")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="the device's peak FLOP/s (in TFLOP/s) for MFU, where the built-in table lacks it (0: the table)")
    args, rest = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    cfg = config_lib.load_config(args.config)
    config_lib.apply_overrides(cfg, dict(r[len("--config."):].split("=", 1) for r in rest))
    with cfg.unlocked():
        cfg.train.steps = max(cfg.train.steps, args.warmup + args.steps * args.rounds + 1)
    dev = jax.devices()[0]
    print(f"device: {jax.device_count()} x {dev.device_kind} ({dev.platform}); config {args.config}; "
          f"batch {cfg.data.batch_size} x seq {cfg.data.seq_len}; compute {cfg.model.dtype}; "
          f"attention {cfg.model.attention_impl}; remat {cfg.model.remat}; load {os.getloadavg()[0]:.2f}")
    threads = args.torch_threads or os.cpu_count() or 1
    runners = [LmtrainRunner(cfg, args.warmup, args.segments, args.peak_tflops * 1e12)]
    if args.torch_gpt:
        runners.append(TorchRunner(cfg, "gpt", args.warmup, threads))
    if args.torch:
        runners.append(TorchRunner(cfg, "hf", args.warmup, threads))
    tokens = cfg.data.batch_size * cfg.data.seq_len * args.steps
    tok_s = [[] for _ in runners]
    for r in range(args.rounds):
        line = []
        for i, runner in enumerate(runners):
            tok_s[i].append(tokens / runner.run(args.steps))
            line.append(f"{runner.name.split(' (')[0]} {tok_s[i][-1]:,.0f}")
        if args.rounds > 1:
            print(f"round {r + 1}: tok/s " + ", ".join(line) + f"; load {os.getloadavg()[0]:.2f}")
    results = []
    for runner, ts in zip(runners, tok_s):
        med = statistics.median(ts)
        results.append({**runner.summary(med, cfg.data.batch_size * cfg.data.seq_len / med),
                        "tokens_per_s_rounds": [round(t, 1) for t in ts]})
    for r in results:
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}))
    for runner, ts in zip(runners[1:], tok_s[1:]):
        ratios = [a / b for a, b in zip(tok_s[0], ts)]
        print(f"ratio lmtrain / {runner.name}: median {statistics.median(ratios):.2f}x "
              f"(per round {', '.join(f'{x:.2f}' for x in ratios)})")
    if args.json:
        with open(args.json, "a") as f:
            for r in results:
                f.write(json.dumps({"config": args.config, "segments": args.segments, **r}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
