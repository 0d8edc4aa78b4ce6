"""The cost of a DPO step against an SFT step at the same shape: the same model, the same [batch, seq_len] rows.

    python tools/benchmark_dpo.py [--config configs/X.py] [--batch-size 8] [--seq-len 256] [--steps 10] \
        [--lora-rank 0] [--out dpo_bench.json]

Modes, each timed over --steps steps after one untimed compile step, on random tokens (cost depends on the shape
only): sft (a packed row per batch row), dpo (a pair row per batch row: the reference model's forward through
prepare(aux, batch), then the policy's train step) and, with --lora-rank > 0, dpo under LoRA (the reference is
the base with the adapters off, inside the loss). Reference log-probabilities are never precomputed here.
Prints and writes milliseconds per step (median) and each mode's ratio to sft. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from lmtrain.runtime import apply_xla_defaults

apply_xla_defaults()  # as `lmtrain train` does, before JAX starts

import jax  # noqa: E402
import numpy as np  # noqa: E402

from lmtrain.config import apply_overrides, load_config  # noqa: E402
from lmtrain.data.formats.pref import pair_batch  # noqa: E402
from lmtrain.data.packing import rows_to_batch  # noqa: E402
from lmtrain.train.state import init_state_fn  # noqa: E402
from lmtrain.train.trainer import Components  # noqa: E402


def _sft_batch(rs, vocab: int, b: int, length: int) -> dict:
    tokens = rs.randint(1, vocab, (b, length + 1))
    weights = (np.arange(length + 1) >= length // 4).astype(np.float32)[None].repeat(b, 0)  # a prompt, then targets
    ones = np.ones((b, length + 1), np.int32)
    return rows_to_batch(tokens, ones, np.broadcast_to(np.arange(length + 1), (b, length + 1)), weights)


def _pair_batch(rs, vocab: int, b: int, length: int) -> dict:
    half = length // 2
    prompt = half // 4
    pairs = []
    for _ in range(b):
        tokens = rs.randint(1, vocab, length)
        mask = np.concatenate([np.zeros(prompt), np.ones(half - prompt), np.zeros(prompt), np.ones(half - prompt)])
        pairs.append({"tokens": tokens, "weights": mask.astype(np.uint8), "chosen_len": half})
    return pair_batch(pairs, length, b)


def _time_mode(cfg, make_batch, steps: int) -> float:
    parts = Components.from_config(cfg)
    state = init_state_fn(parts.model_def, parts.tx, cfg.train.seed, parts.plan)()
    start = jax.tree.map(jax.numpy.copy, state["params"])  # the step donates the state; the reference keeps its own
    aux = parts.task.init_aux(parts.model_def, start) if parts.task.uses_aux() else None
    prepare = jax.jit(parts.task.prepare) if aux is not None else (lambda _aux, batch: batch)
    step = jax.jit(parts.train_step, donate_argnums=0)
    rs = np.random.RandomState(0)
    batch = make_batch(rs, cfg.model.vocab_size, cfg.data.batch_size, cfg.data.seq_len)
    state, metrics = step(state, prepare(aux, batch))  # compile
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, prepare(aux, batch))
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="tiny", help="a config (its model and optimizer), as `lmtrain train` takes it")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lora-rank", type=int, default=0, help="also time DPO under LoRA of this rank")
    p.add_argument("--out", "--json", dest="out", default="",
                   help="write the results here as JSON (--json: the name tools/device_check.py passes)")
    args = p.parse_args(argv)
    max_seq_len = max(args.seq_len, load_config(args.config).model.max_seq_len)
    common = {"data.batch_size": str(args.batch_size), "data.seq_len": str(args.seq_len),
              "model.max_seq_len": str(max_seq_len), "train.grad_accum": "1"}
    modes = [("sft", {"task.name": "sft"}, _sft_batch), ("dpo", {"task.name": "dpo"}, _pair_batch)]
    if args.lora_rank:
        modes.append(("dpo_lora", {"task.name": "dpo", "model.lora_rank": str(args.lora_rank)}, _pair_batch))
    results = {"device": str(jax.devices()[0].device_kind), "batch_size": args.batch_size, "seq_len": args.seq_len,
               "reference": "computed every step (prepare, or the LoRA base in the loss); not precomputed"}
    for name, overrides, make_batch in modes:
        mode_cfg = load_config(args.config)
        apply_overrides(mode_cfg, {**common, **overrides})
        results[f"{name}_ms_per_step"] = round(_time_mode(mode_cfg, make_batch, args.steps), 3)
    for name, _, _ in modes[1:]:
        results[f"{name}_over_sft"] = round(results[f"{name}_ms_per_step"] / results["sft_ms_per_step"], 3)
    print(json.dumps(results, indent=1))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
