"""Fine-tune a BERT classifier with lmtrain and with transformers' PyTorch BertForSequenceClassification on the
same data, shape and starting weights, interleaved step by step in one process; report tokens/s and accuracy.

    python tools/benchmark_bert.py --shards workdir/bert_classify_shards --tokenizer workdir/bert_tokenizer \
        [--init-from workdir/bert_tiny] [--steps 300] [--out bert_bench.json]

Both sides train on the same batches in the same order (the lmtrain loader's, --seq-len tokens per row,
right-padded) from the same weights: lmtrain's initial parameters (fresh, or the encoder of --init-from with a
fresh pooler and classifier) are exported as a BertForSequenceClassification and loaded by transformers.
Both use AdamW with BERT's settings (no decay on biases, norms and embeddings), linear warmup then cosine
decay, global-norm clipping at 1.0, and dropout on the embeddings and each sublayer's output only (what
lmtrain's `model.dropout` covers: transformers' attention-probability and classifier dropout are set to 0).
Steps alternate (lmtrain step, torch step), so both see the same machine load; the first --warmup steps of
each (lmtrain's compile) are not timed. tokens/s counts every slot of a batch, padding included, alike for
both. Accuracy is measured on the validation and test splits at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

from lmtrain.runtime import apply_xla_defaults

apply_xla_defaults()  # as `lmtrain train` does, before JAX starts

import jax  # noqa: E402
import numpy as np  # noqa: E402

from lmtrain.config import load_config  # noqa: E402
from lmtrain.data import shards as shards_lib  # noqa: E402
from lmtrain.param_rules import ParamPlan  # noqa: E402
from lmtrain.train.checkpoint import load_init_params  # noqa: E402
from lmtrain.train.state import init_state_fn  # noqa: E402
from lmtrain.train.trainer import Components  # noqa: E402
from lmtrain.trees import flat_paths, nest_paths  # noqa: E402


def _config(args):
    cfg = load_config("bert_tiny_classify")
    with cfg.unlocked():
        cfg.data.shards_dir, cfg.data.tokenizer_dir = args.shards, args.tokenizer
        cfg.data.seq_len, cfg.data.batch_size = args.seq_len, args.batch_size
        cfg.train.init_from = args.init_from
        cfg.train.steps, cfg.optimizer.lr = args.steps, args.lr
        cfg.optimizer.warmup_steps = max(1, args.steps // 10)
        cfg.model.vocab_size = shards_lib.load_manifest(args.shards)["vocab_size"]
    return cfg


def _initial_state(parts, cfg):
    """lmtrain's starting state: fresh, or with the encoder of train.init_from (pooler and classifier fresh)."""
    state = jax.jit(init_state_fn(parts.model_def, parts.tx, cfg.train.seed, parts.plan))()
    if cfg.train.init_from:
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state["params"])
        params, fresh, _ = load_init_params(cfg.train.init_from, target, "latest")
        flat_fresh = {p: v for p, v in flat_paths(state["params"]).items() if p in fresh}
        state["params"] = ParamPlan.merge(params, nest_paths(flat_fresh))
        state["opt_state"] = parts.tx.init(parts.plan.split(state["params"])[0])
    return state


def _torch_model(cfg, params, labels, directory):
    """transformers' BertForSequenceClassification holding exactly lmtrain's starting weights."""
    import torch
    from transformers import BertForSequenceClassification

    from lmtrain.interop.hf_export import export_params

    export_params(cfg, jax.device_get(params), directory, labels=labels)
    model = BertForSequenceClassification.from_pretrained(directory, hidden_dropout_prob=cfg.dropout,
                                                          attention_probs_dropout_prob=0.0, classifier_dropout=0.0,
                                                          trust_remote_code=False)
    return model.to(torch.float32).train()


def _torch_optimizer(model, cfg, steps: int):
    """AdamW and schedule as lmtrain's config: no decay on biases, norms and embeddings; warmup, then cosine."""
    import torch

    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n or "embeddings" in n]
    decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n or "embeddings" in n)]
    o = cfg.optimizer
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)

    def lr_factor(step: int) -> float:  # lmtrain's warmup_cosine: step 1 takes lr / warmup
        s = step + 1
        if s <= o.warmup_steps:
            return s / o.warmup_steps
        t = min(1.0, (s - o.warmup_steps) / max(1, steps - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)


def _torch_step(model, opt, sched, batch, clip: float) -> float:
    import torch

    ids = torch.from_numpy(np.asarray(batch["inputs"], np.int64))
    mask = torch.from_numpy(np.asarray(batch["segment_ids"] > 0, np.int64))
    labels = torch.from_numpy(np.asarray(batch["labels"], np.int64))
    weights = torch.from_numpy(np.asarray(batch["weights"], np.float32))
    logits = model(input_ids=ids, attention_mask=mask).logits
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    loss = (ce * weights).sum() / weights.sum().clamp_min(1e-9)  # the same loss as lmtrain's classify task
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    sched.step()
    return float(loss.detach())


def _accuracy_lmtrain(parts, params, batches) -> float:
    eval_step = jax.jit(parts.task.eval_step(parts.model_def))
    confusion = sum(np.asarray(eval_step(params, b)["confusion"]) for b in batches)
    return float(np.trace(confusion) / confusion.sum())


def _accuracy_torch(model, batches) -> float:
    import torch

    model.eval()
    right = total = 0.0
    with torch.no_grad():
        for b in batches:
            ids = torch.from_numpy(np.asarray(b["inputs"], np.int64))
            mask = torch.from_numpy(np.asarray(b["segment_ids"] > 0, np.int64))
            pred = model(input_ids=ids, attention_mask=mask).logits.argmax(-1).numpy()
            right += float(((pred == b["labels"]) * b["weights"]).sum())
            total += float(b["weights"].sum())
    model.train()
    return right / total


def run(args) -> dict:
    import torch

    torch.manual_seed(0)
    cfg = _config(args)
    parts = Components.from_config(cfg)
    task = parts.task
    data = task.make_data(tempfile.mkdtemp(prefix="bench-bert-"), 0, 1)
    state = _initial_state(parts, cfg)
    step_fn = jax.jit(parts.train_step, donate_argnums=0)
    with tempfile.TemporaryDirectory() as tmp:
        model = _torch_model(parts.model_def.cfg, state["params"], [str(x) for x in task.labels], os.path.join(tmp, "hf"))
    opt, sched = _torch_optimizer(model, cfg, args.steps)
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    timed = {"lmtrain": 0.0, "torch": 0.0}
    losses = {"lmtrain": [], "torch": []}
    for step in range(args.steps):
        batch = next(data.train)
        t0 = time.perf_counter()
        state, metrics = step_fn(state, batch)
        loss = float(metrics["loss"])  # waits for the step
        t1 = time.perf_counter()
        torch_loss = _torch_step(model, opt, sched, batch, cfg.optimizer.clip_norm)
        t2 = time.perf_counter()
        if step >= args.warmup:
            timed["lmtrain"] += t1 - t0
            timed["torch"] += t2 - t1
        losses["lmtrain"].append(loss)
        losses["torch"].append(torch_loss)
        if (step + 1) % args.log_every == 0:
            print(f"step {step + 1}: loss lmtrain {loss:.4f} torch {torch_loss:.4f}", flush=True)
    n_timed = args.steps - args.warmup
    result = {
        "device": f"{jax.devices()[0].platform} ({os.cpu_count()} cores), torch threads {torch.get_num_threads()}",
        "shape": {"batch": cfg.data.batch_size, "seq_len": cfg.data.seq_len, "d_model": cfg.model.d_model,
                  "n_layers": cfg.model.n_layers, "vocab": cfg.model.vocab_size,
                  "parameters": parts.model_def.num_params()},
        "steps": args.steps, "timed_steps": n_timed, "init_from": args.init_from or "fresh weights",
        "classes": len(task.labels),
    }
    for split in data.splits:
        if split == "train":
            continue
        batches = list(data.eval_batches(0, split))
        result[f"{split}_examples"] = int(sum(b["weights"].sum() for b in batches))
        result.setdefault("lmtrain", {})[f"{split}_accuracy"] = _accuracy_lmtrain(parts, state["params"], batches)
        result.setdefault("torch", {})[f"{split}_accuracy"] = _accuracy_torch(model, batches)
    for side in ("lmtrain", "torch"):
        result[side].update(tokens_per_s=n_timed * tokens_per_step / max(timed[side], 1e-9),
                            seconds_per_step=timed[side] / max(n_timed, 1),
                            final_loss=float(np.mean(losses[side][-10:])))
    result["speedup_lmtrain_over_torch"] = result["lmtrain"]["tokens_per_s"] / result["torch"]["tokens_per_s"]
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", required=True, help="classify shards (tools/shard_data.py --builtin-task classify)")
    p.add_argument("--tokenizer", required=True, help="the tokenizer the shards were made with")
    p.add_argument("--init-from", default="", help="an MLM-pretrained lmtrain WORKDIR (configs/bert_tiny.py)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps (lmtrain compiles in step 1)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--out", default="", help="also write the result as JSON here")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.steps <= args.warmup:
        p.error(f"--steps {args.steps} must exceed --warmup {args.warmup}")
    result = run(args)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    lm, th = result["lmtrain"], result["torch"]
    print(f"\n| | tokens/s | validation accuracy | test accuracy |\n|---|---|---|---|\n"
          f"| lmtrain (JAX) | {lm['tokens_per_s']:,.0f} | {lm.get('validation_accuracy', float('nan')):.3f} | "
          f"{lm.get('test_accuracy', float('nan')):.3f} |\n"
          f"| transformers (PyTorch) | {th['tokens_per_s']:,.0f} | {th.get('validation_accuracy', float('nan')):.3f} | "
          f"{th.get('test_accuracy', float('nan')):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
