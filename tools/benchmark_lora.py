"""LoRA against full fine-tuning: tokens/s, the parameters' and optimizer state's bytes, and the step's peak memory,
for the same model shape in the same process.

    python tools/benchmark_lora.py                                      # the shapes in BENCHMARKS.md, on this machine
    python tools/benchmark_lora.py --shape llama_1b --rounds 5 --steps 5 --rank 16 --json lora.json
    python tools/benchmark_lora.py --shape llama_1b:runlocal --set model.n_layers=4 --set data.batch_size=16

Both variants run the trainer's own jitted step (lmtrain.train.trainer.Components) on the same random batches:
full fine-tuning (every parameter trains, AdamW state for each) and LoRA (model.lora_rank on --targets, the base
frozen: no gradient, no optimizer state). They are timed in turn, round after round (full, LoRA, full, ...), so a
change in the machine's load hits both; the medians and the median of per-round ratios are reported.

Memory is XLA's account of the compiled step (`memory_analysis()`): its peak (arguments, outputs and
temporaries, donated buffers counted once), and the bytes of the state it carries from step to step
(trained parameters, frozen parameters, optimizer state). Host RSS is not used: on CPU it only ever grows, so it
cannot tell two variants in one process apart.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
from lmtrain.train.state import create_sharded_state  # noqa: E402
from lmtrain.train.trainer import Components  # noqa: E402

# Named shapes: a config (with its CPU switch) and overrides. llama_20m is a ~20M-parameter Llama (vocabulary
# 16k, 6 blocks of width 384) that a few CPU cores step in about a second.
SHAPES = {
    "gpt2_small:runlocal": ("gpt2_small:runlocal", {}),
    "llama_1b:runlocal": ("llama_1b:runlocal", {}),
    "llama_20m": ("llama_1b:runlocal", {"model.vocab_size": "16384", "model.d_model": "384", "model.n_layers": "6",
                                        "model.n_heads": "6", "model.n_kv_heads": "2", "model.d_ff": "1024",
                                        "model.max_seq_len": "256", "data.seq_len": "256", "data.batch_size": "4"}),
    "llama_1b": ("llama_1b", {"model.dtype": "float32", "model.logits_dtype": "float32", "data.batch_size": "1",
                              "data.seq_len": "512", "train.grad_accum": "1"}),
}
DEFAULT_SHAPES = ("gpt2_small:runlocal", "llama_1b:runlocal", "llama_20m")


def _config(shape: str, sets: list[str], lora: bool, rank: int, alpha: float, targets: tuple[str, ...]):
    name, overrides = SHAPES.get(shape, (shape, {}))
    cfg = config_lib.load_config(name)
    extra = dict(s.split("=", 1) for s in sets)
    config_lib.apply_overrides(cfg, {**overrides, **extra, "mesh.data": "1", "mesh.fsdp": "1", "mesh.tensor": "1",
                                     "train.grad_accum": extra.get("train.grad_accum", "1")})
    with cfg.unlocked():
        cfg.optimizer.warmup_steps = 1
        if lora:
            mlp = cfg.model.mlp
            cfg.model.lora_rank, cfg.model.lora_alpha = rank, alpha
            cfg.model.lora_targets = tuple(t for t in targets if t != "gate" or mlp == "swiglu")
    return cfg


def _batch(cfg, rng) -> dict:
    b, length, v = cfg.data.batch_size * cfg.train.grad_accum, cfg.data.seq_len, cfg.model.vocab_size
    tokens = rng.integers(0, v, (b, length + 1), dtype=np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((b, length), np.float32),
            "segment_ids": np.ones((b, length), np.int32),
            "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (b, length)).copy()}


def _nbytes(tree) -> int:
    return int(sum(x.nbytes for x in jax.tree.leaves(tree)))


class Variant:
    """One way to fine-tune (full or LoRA): its state, its compiled step and what XLA says the step needs."""

    def __init__(self, name: str, cfg):
        self.name, self.cfg = name, cfg
        self.mesh, self.rules = make_mesh((1, 1, 1), jax.devices()[:1]), cfg.mesh.axis_rules
        parts = Components.from_config(cfg)
        self.n_train, self.n_frozen = parts.plan.counts(parts.model_def.shapes)
        rng = np.random.default_rng(0)
        with axis_rules(self.mesh, self.rules):
            self.state, shardings, _ = create_sharded_state(parts.model_def, parts.tx, 0, self.mesh, self.rules, parts.plan)
            spec = PartitionSpec(logical_to_spec(("batch",), self.rules, self.mesh)[0], None)
            batch_sharding = NamedSharding(self.mesh, spec)
            self.batches = [jax.device_put(_batch(cfg, rng), batch_sharding) for _ in range(2)]
            step = jax.jit(parts.train_step, in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
                           donate_argnums=0)
            t0 = time.perf_counter()
            compiled = step.lower(self.state, self.batches[0]).compile()
            self.compile_s = time.perf_counter() - t0
            self.memory = compiled.memory_analysis()
            self.step = compiled
        self.bytes = {"trained_params": _nbytes(self.state["params"]), "frozen_params": _nbytes(self.state.get("frozen", {})),
                      "optimizer_state": _nbytes(self.state["opt_state"])}
        self.run(1)  # first execution (allocation) not timed

    def run(self, steps: int) -> float:
        t0 = time.perf_counter()
        m = None
        for i in range(steps):
            self.state, m = self.step(self.state, self.batches[i % 2])
        jax.block_until_ready(m)
        self.loss = float(m["loss"])
        return time.perf_counter() - t0

    def peak_bytes(self) -> int:
        """Arguments + outputs + temporaries, the donated (aliased) state counted once: an upper bound on what the
        step holds at once. (XLA:CPU's own peak_memory_in_bytes leaves the temporaries out.)"""
        m = self.memory
        return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)


def compare(shape: str, args) -> dict:
    variants = [Variant(name, _config(shape, args.set, name == "lora", args.rank, args.alpha, args.targets))
                for name in ("full", "lora")]
    cfg = variants[0].cfg
    tokens = cfg.data.batch_size * cfg.train.grad_accum * cfg.data.seq_len * args.steps
    rates: dict[str, list[float]] = {v.name: [] for v in variants}
    for _ in range(args.rounds):
        for v in variants:
            rates[v.name].append(tokens / v.run(args.steps))
    ratios = [lo / full for lo, full in zip(rates["lora"], rates["full"])]
    out = {"shape": shape, "params_M": (variants[0].n_train + variants[0].n_frozen) / 1e6,
           "tokens_per_step": tokens // args.steps, "rank": args.rank, "targets": list(variants[1].cfg.model.lora_targets),
           "lora_speedup_median": statistics.median(ratios), "variants": {}}
    for v in variants:
        state = sum(v.bytes.values())
        out["variants"][v.name] = {
            "tokens_per_s_median": statistics.median(rates[v.name]), "tokens_per_s_rounds": rates[v.name],
            "trained_params_M": v.n_train / 1e6, **{f"{k}_MiB": b / 2**20 for k, b in v.bytes.items()},
            "params_and_optimizer_MiB": state / 2**20, "step_peak_MiB": v.peak_bytes() / 2**20,
            "step_temp_MiB": v.memory.temp_size_in_bytes / 2**20, "compile_s": v.compile_s, "last_loss": v.loss}
    full, lora = out["variants"]["full"], out["variants"]["lora"]
    out["optimizer_state_drop_MiB"] = full["optimizer_state_MiB"] - lora["optimizer_state_MiB"]
    out["state_fraction"] = lora["params_and_optimizer_MiB"] / full["params_and_optimizer_MiB"]
    out["trained_state_fraction"] = ((lora["trained_params_MiB"] + lora["optimizer_state_MiB"])
                                     / (full["trained_params_MiB"] + full["optimizer_state_MiB"]))
    out["peak_fraction"] = lora["step_peak_MiB"] / full["step_peak_MiB"]
    return out


def markdown(results: list[dict]) -> str:
    lines = ["| shape | params | variant | trained params | tokens/s (median) | params + optimizer state | of which "
             "optimizer state | step peak (XLA) |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for name, v in r["variants"].items():
            lines.append(f"| {r['shape']} | {r['params_M']:.1f}M | {name} | {v['trained_params_M']:.3f}M | "
                         f"{v['tokens_per_s_median']:,.0f} | {v['params_and_optimizer_MiB']:.1f} MiB | "
                         f"{v['optimizer_state_MiB']:.1f} MiB | {v['step_peak_MiB']:.1f} MiB |")
    lines += ["", "| shape | LoRA / full tokens/s (median of rounds) | LoRA params+state / full | optimizer state "
              "dropped | LoRA step peak / full |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['shape']} | {r['lora_speedup_median']:.2f}x | {r['state_fraction']:.1%} | "
                     f"{r['optimizer_state_drop_MiB']:.1f} MiB | {r['peak_fraction']:.1%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmark_lora", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", action="append", help=f"a named shape ({', '.join(SHAPES)}) or a config "
                        f"NAME[:ARG]; repeatable (default: {', '.join(DEFAULT_SHAPES)})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every shape, e.g. model.n_layers=4")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--targets", default="q,k,v,o,gate,up,down", help="LoRA targets, comma-separated")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round and variant")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    args.targets = tuple(t for t in args.targets.split(",") if t)
    results = []
    for shape in args.shape or DEFAULT_SHAPES:
        try:
            results.append(compare(shape, args))
        except config_lib.ConfigError as e:
            print(f"benchmark_lora: error: {e}", file=sys.stderr)
            return 2
        print(json.dumps(results[-1], indent=1), flush=True)
    print(f"\n{jax.devices()[0].platform} ({jax.devices()[0].device_kind}), {os.cpu_count()} CPUs visible, "
          f"{platform.processor() or platform.machine()}, jax {jax.__version__}\n")
    print(markdown(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
