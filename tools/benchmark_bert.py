"""Fine-tune a BERT classifier with lmtrain and with transformers' PyTorch BertForSequenceClassification on the
same batches from the same starting weights, in interleaved timed rounds; report real (non-padding) tokens/s.

    python tools/benchmark_bert.py --model PATH --shards CLASSIFY_SHARDS [--tokenizer DIR] \
        [--batches 8] [--rounds 3] [--batch-size 16] [--seq-len 256] [--out bert_bench.json]

--model is an lmtrain WORKDIR (its latest checkpoint, or the init_params of `lmtrain import`) or a Hugging Face
BERT directory (config.json + safetensors, imported into a temporary WORKDIR first); without it, the fresh
configs/bert_tiny_classify.py encoder. The shards come from tools/shard_data.py --format classify made with the
model's tokenizer (--tokenizer, default WORKDIR/tokenizer). The pooler (unless the model has one) and the
classifier start fresh, the same on both sides: lmtrain's initial parameters are exported as a
BertForSequenceClassification and loaded by transformers.

Both sides train on the same --batches batches (the lmtrain loader's, each global batch of --batch-size rows):
lmtrain with its length bucketing (data.length_buckets, --length-buckets), transformers with dynamic padding
(each batch cut to its longest example), as a transformers user would run it. Both use AdamW with BERT's
settings (no decay on biases, norms and embeddings, b2 0.999, weight decay 0.01), global-norm clipping at 1.0 and
the model's dropout. One untimed pass per side compiles lmtrain's step for each row length; then --rounds rounds
each time every batch on both sides, alternating which goes first. tokens/s counts real tokens only (the same
number for both); slots/s counts what each side computed, padding included. The speed-up is the median of the
per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from lmtrain.runtime import apply_xla_defaults

apply_xla_defaults()  # as `lmtrain train` does, before JAX starts

import jax  # noqa: E402
import numpy as np  # noqa: E402

from lmtrain.config import ConfigError, load_config  # noqa: E402
from lmtrain.data import shards as shards_lib  # noqa: E402
from lmtrain.interop.families import HFInteropError  # noqa: E402
from lmtrain.interop.hf_export import export_params  # noqa: E402
from lmtrain.interop.hf_import import import_hf  # noqa: E402
from lmtrain.param_rules import ParamPlan  # noqa: E402
from lmtrain.train.checkpoint import load_init_params  # noqa: E402
from lmtrain.train.state import init_state_fn  # noqa: E402
from lmtrain.train.trainer import Components  # noqa: E402
from lmtrain.trees import flat_paths, nest_paths  # noqa: E402


def _model_workdir(model: str, scratch: Path) -> Path:
    """The lmtrain WORKDIR of --model: itself, or a Hugging Face directory imported into `scratch`."""
    path = Path(model)
    config = path / "config.json"
    if not config.is_file():
        raise ConfigError(f"--model {model}: no config.json there; give an lmtrain WORKDIR or a Hugging Face BERT "
                          "directory (config.json + model.safetensors).")
    try:
        fields = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{config} is not valid JSON ({e}).") from None
    if "model_type" not in fields:
        return path
    if fields["model_type"] != "bert":
        raise ConfigError(f"--model {model} is a Hugging Face '{fields['model_type']}' model; this benchmark "
                          "compares BERT encoders with BertForSequenceClassification.")
    return Path(import_hf(path, scratch / "imported"))


def _init_from(workdir: Path) -> str:
    """What to start from: the WORKDIR's latest checkpoint, or the weights `lmtrain import` wrote."""
    checkpoints = workdir / "checkpoints"
    if checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir()):
        return str(workdir)
    if (workdir / "init_params").is_dir():
        return str(workdir / "init_params")
    raise ConfigError(f"--model {workdir} holds neither a checkpoint nor init_params; train it first, or give "
                      "a Hugging Face directory.")


def _config(args, scratch: Path):
    if args.model:
        workdir = _model_workdir(args.model, scratch)
        cfg = load_config(str(workdir / "config.json"))
        init_from, tokenizer = _init_from(workdir), args.tokenizer or str(workdir / "tokenizer")
    else:
        cfg, init_from, tokenizer = load_config("bert_tiny_classify"), "", args.tokenizer
    if cfg.model.causal or cfg.model.norm_position != "post":
        raise ConfigError(f"--model {args.model}: a {'decoder' if cfg.model.causal else 'pre-norm encoder'}, not a "
                          "BERT encoder; this benchmark compares with BertForSequenceClassification.")
    if not tokenizer:
        raise ConfigError("--tokenizer is needed without --model: the tokenizer the shards were made with.")
    vocab = shards_lib.load_manifest(args.shards)["vocab_size"]
    if vocab > cfg.model.vocab_size:
        raise ConfigError(f"--shards {args.shards} were made with a {vocab}-token tokenizer, larger than the model's "
                          f"{cfg.model.vocab_size}: re-shard with the model's tokenizer ({tokenizer}).")
    with cfg.unlocked():
        cfg.task.name, cfg.model.num_labels = "classify", 0
        cfg.data.source, cfg.data.shards_dir, cfg.data.tokenizer_dir = "shards", args.shards, tokenizer
        cfg.data.seq_len, cfg.data.batch_size = args.seq_len, args.batch_size
        cfg.data.length_buckets = args.length_buckets
        cfg.train.init_from, cfg.train.grad_accum = init_from, 1
        cfg.optimizer.lr, cfg.optimizer.b2, cfg.optimizer.weight_decay = args.lr, 0.999, 0.01
        cfg.optimizer.warmup_steps = 1
        cfg.train.steps = (args.rounds + 1) * args.batches  # the untimed pass and the rounds
        cfg.optimizer.clip_norm = 1.0
    return cfg


def _initial_state(parts, cfg):
    """lmtrain's starting state: fresh, or the weights of train.init_from (a pooler it lacks and the classifier fresh)."""
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

    export_params(cfg, jax.device_get(params), directory, labels=labels)
    model = BertForSequenceClassification.from_pretrained(
        directory, hidden_dropout_prob=cfg.dropout, classifier_dropout=0.0,
        attention_probs_dropout_prob=getattr(cfg, "attention_dropout", 0.0), trust_remote_code=False)
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


def dynamic_padding(batch: dict) -> dict:
    """The batch as transformers' DataCollatorWithPadding gives it: every row cut to the batch's longest example."""
    longest = max(1, int((np.asarray(batch["segment_ids"]) > 0).sum(1).max()))
    return {k: (v[:, :longest] if np.ndim(v) == 2 else v) for k, v in batch.items()}


def real_tokens(batches: list[dict]) -> int:
    return sum(int(np.count_nonzero(b["segment_ids"])) for b in batches)


def slots(batches: list[dict]) -> int:
    return sum(int(np.asarray(b["segment_ids"]).size) for b in batches)


def run(args) -> dict:
    import torch

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench-bert-") as tmp:
        cfg = _config(args, Path(tmp))
        parts = Components.from_config(cfg)
        data = parts.task.make_data(tmp, 0, 1)  # writes labels.json there
        state = _initial_state(parts, cfg)
        model = _torch_model(parts.model_def.cfg, state["params"], [str(x) for x in parts.task.labels],
                             os.path.join(tmp, "hf"))
        batches = [next(data.train) for _ in range(args.batches)]
        if hasattr(data.train, "close"):
            data.train.close()
    torch_batches = [dynamic_padding(b) for b in batches]
    opt, sched = _torch_optimizer(model, cfg, cfg.train.steps)
    step_fn = jax.jit(parts.train_step, donate_argnums=0)
    holder = {"state": state}

    def lmtrain_pass() -> float:
        loss = None
        for b in batches:
            holder["state"], metrics = step_fn(holder["state"], b)
            loss = metrics["loss"]
        return float(loss)  # waits for the last step

    def torch_pass() -> float:
        return [_torch_step(model, opt, sched, b, cfg.optimizer.clip_norm) for b in torch_batches][-1]

    passes = {"lmtrain": lmtrain_pass, "torch": torch_pass}
    for side in passes:  # untimed: lmtrain compiles one step per row length here
        passes[side]()
    real = real_tokens(batches)
    rates: dict[str, list[float]] = {"lmtrain": [], "torch": []}
    losses: dict[str, float] = {}
    for r in range(args.rounds):
        for side in (("lmtrain", "torch") if r % 2 == 0 else ("torch", "lmtrain")):
            t0 = time.perf_counter()
            losses[side] = passes[side]()
            rates[side].append(real / (time.perf_counter() - t0))
        print(f"round {r + 1}: real tokens/s lmtrain {rates['lmtrain'][-1]:,.0f}, transformers "
              f"{rates['torch'][-1]:,.0f}; load {os.getloadavg()[0]:.2f}", flush=True)
    lengths = sorted({b["inputs"].shape[1] for b in batches})
    result = {
        "device": f"{jax.devices()[0].platform} ({os.cpu_count()} cores), torch threads {torch.get_num_threads()}",
        "model": args.model or "bert_tiny_classify (fresh)",
        "shape": {"batch": cfg.data.batch_size, "seq_len": cfg.data.seq_len, "d_model": cfg.model.d_model,
                  "n_layers": cfg.model.n_layers, "n_heads": cfg.model.n_heads, "vocab": cfg.model.vocab_size,
                  "parameters": parts.model_def.num_params()},
        "batches": len(batches), "rounds": args.rounds, "real_tokens_per_pass": real,
        "lmtrain_row_lengths": lengths, "classes": len(parts.task.labels),
    }
    for side, side_batches in (("lmtrain", batches), ("torch", torch_batches)):
        median = statistics.median(rates[side])
        result[side] = {"tokens_per_s": median, "tokens_per_s_rounds": [round(x, 1) for x in rates[side]],
                        "slots_per_s": median * slots(side_batches) / real,
                        "padding": 1 - real / slots(side_batches), "last_loss": losses[side]}
    result["speedup_lmtrain_over_torch"] = statistics.median(
        a / b for a, b in zip(rates["lmtrain"], rates["torch"]))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", "--init-from", dest="model", default="",
                   help="an lmtrain WORKDIR or a Hugging Face BERT directory (default: the fresh bert_tiny_classify "
                        "encoder); --init-from is its older name")
    p.add_argument("--shards", required=True, help="classify shards made with the model's tokenizer "
                                                   "(tools/shard_data.py --format classify)")
    p.add_argument("--tokenizer", default="", help="the tokenizer the shards were made with (default WORKDIR/tokenizer)")
    p.add_argument("--batches", type=int, default=8, help="batches per timed pass, the same on both sides")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (after one untimed pass per side)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--length-buckets", type=int, default=16, help="lmtrain's data.length_buckets (0: pad to --seq-len)")
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--out", default="", help="also write the result as JSON here")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.batches < 1 or args.rounds < 1:
        p.error("--batches and --rounds must be at least 1")
    try:
        result = run(args)
    except (ConfigError, HFInteropError) as e:  # the user's paths or model: one line, no traceback
        print(f"benchmark_bert: error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    lm, th = result["lmtrain"], result["torch"]
    print(f"\n| | real tokens/s (median of {args.rounds}) | slots/s | padding |\n|---|---|---|---|\n"
          f"| lmtrain (JAX, length buckets) | {lm['tokens_per_s']:,.0f} | {lm['slots_per_s']:,.0f} | "
          f"{100 * lm['padding']:.0f}% |\n"
          f"| transformers (PyTorch, dynamic padding) | {th['tokens_per_s']:,.0f} | {th['slots_per_s']:,.0f} | "
          f"{100 * th['padding']:.0f}% |\n\nlmtrain / transformers: {result['speedup_lmtrain_over_torch']:.2f}x "
          "(median of the per-round ratios)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
