"""GRPO demo on CPU: single-digit sums ('3+4=' -> '7'), answered exactly, scored on held-out prompts.

    python tools/demo_grpo.py --output /tmp/grpo_demo [--sft-steps 150] [--grpo-steps 60]

1. a 512-token BPE on the built-in corpus, and the 100 sums as sft shards (20% held out for validation);
2. a tiny Llama fine-tuned on them briefly (`sft`): the start GRPO needs, a model that is sometimes right;
3. `grpo` from it with the exact-match reward; the held-out reward (greedy answers) before and after, and the
   share of the GRPO run's wall time spent sampling (generation, rewards, old/reference log-probabilities).
No download; nothing here is timed in the tests.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax

from lmtrain.config import apply_overrides, base_config
from lmtrain.data.builtin_corpus import builtin_documents
from lmtrain.data.tokenizer import train_bpe_tokenizer
from lmtrain.tasks import make_task
from lmtrain.tasks.grpo import GroupRelativePolicyOptimization
from lmtrain.train.trainer import Components, train
from lmtrain.workdir import restore_params
from tools import shard_data

MODEL = {"model.vocab_size": 512, "model.d_model": 128, "model.n_layers": 2, "model.n_heads": 4,
         "model.n_kv_heads": 2, "model.d_ff": 256, "model.max_seq_len": 16, "data.seq_len": 16,
         "logging.progress_bar": False, "logging.tensorboard": False, "logging.loss_curve_png": False,
         "train.sample_tokens": 0, "checkpoint.keep": 1}


def config(**overrides):
    cfg = base_config()
    apply_overrides(cfg, {k: str(v) for k, v in {**MODEL, **overrides}.items()})
    return cfg


def make_data(out: pathlib.Path) -> tuple[str, str]:
    tok = out / "tokenizer"
    if not tok.exists():
        train_bpe_tokenizer(builtin_documents(40), 512, tok)
    records = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(10) for b in range(10)]
    (out / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    shards = out / "shards"
    if not shards.exists():
        assert shard_data.main(["--input", str(out / "sums.jsonl"), "--format", "sft", "--tokenizer", str(tok),
                                "--output", str(shards), "--seq-len", "16", "--val-fraction", "0.2",
                                "--quiet"]) == 0
    return str(tok), str(shards)


def held_out_reward(cfg, workdir) -> float:
    """Mean exact match of greedy answers to the validation prompts, for the WORKDIR's latest parameters."""
    task = make_task(cfg)
    model_def = Components.from_config(cfg).model_def
    data = task.make_data(workdir, 0, 1)
    _, params = restore_params(workdir)
    return task.extra_eval(model_def, params, data)["val_reward"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--sft-steps", type=int, default=150)
    parser.add_argument("--grpo-steps", type=int, default=60)
    parser.add_argument("--group-size", type=int, default=8)
    args = parser.parse_args(argv)
    out = pathlib.Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    tok, shards = make_data(out)
    data = {"data.source": "shards", "data.tokenizer_dir": tok, "data.shards_dir": shards}
    sft = config(**data, **{"task.name": "sft", "train.steps": args.sft_steps, "data.batch_size": 16,
                            "optimizer.lr": 3e-3, "optimizer.warmup_steps": 10, "train.eval_every": args.sft_steps,
                            "task.eval_generate_examples": 0})
    start = time.perf_counter()
    train(sft, out / "sft")
    sft_seconds = time.perf_counter() - start

    grpo = config(**data, **{"task.name": "grpo", "train.steps": args.grpo_steps, "data.batch_size": 16,
                             "optimizer.lr": 5e-4, "optimizer.warmup_steps": 5, "train.eval_every": args.grpo_steps // 4,
                             "train.init_from": str(out / "sft"), "task.grpo_group_size": args.group_size,
                             "task.grpo_max_new_tokens": 3, "task.grpo_eval_prompts": 20, "task.grpo_kl_coef": 0.02})
    before = held_out_reward(grpo, out / "sft")
    sampling = [0.0]
    rollout = GroupRelativePolicyOptimization.rollout

    def timed(self, *a):
        jax.block_until_ready(a[2])  # the parameters: the previous training step has finished
        t = time.perf_counter()
        batch = rollout(self, *a)
        sampling[0] += time.perf_counter() - t
        return batch

    GroupRelativePolicyOptimization.rollout = timed
    start = time.perf_counter()
    result = train(grpo, out / "grpo")
    grpo_seconds = time.perf_counter() - start
    after = held_out_reward(grpo, out / "grpo")
    history = [json.loads(line) for line in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    rewards = [(r["step"], round(r["reward"], 3)) for r in history if "reward" in r]
    print(json.dumps({"held_out_reward_before": before, "held_out_reward_after": after,
                      "val_reward_by_eval": [(r["step"], r["val_reward"]) for r in history if "val_reward" in r],
                      "train_reward_first_last": [rewards[0], rewards[-1]], "sft_seconds": round(sft_seconds, 1),
                      "grpo_seconds": round(grpo_seconds, 1), "sampling_share": round(sampling[0] / grpo_seconds, 3),
                      "devices": f"{jax.device_count()} {jax.devices()[0].platform}", "final": result.metrics},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
