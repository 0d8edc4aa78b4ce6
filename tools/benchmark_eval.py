"""Generation inside `lmtrain eval`: greedy tokens/s with the KV cache, batched, against transformers' `generate` on
the same model (exported with `lmtrain export`, loaded with AutoModelForCausalLM) and the same prompts, in one run
on this machine's CPU.

    python tools/benchmark_eval.py --workdir workdir/tiny_sft --data workdir/sft_shards
    python tools/benchmark_eval.py --workdir workdir/tiny_sft --data workdir/sft_shards --examples 64 --batch 16 32

Prompts are the first --examples prompts of the shards' test split (validation when there is none), as
`lmtrain eval` builds them. Both sides generate exactly --new-tokens tokens per prompt (EOS ignored), so
tokens/s counts the same work; compilation (lmtrain) and the first call (transformers) are timed apart, and
each figure is the best of --repeats timed runs. The greedy tokens of the two sides are compared as a check.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("LMTRAIN_SINGLE_HOST", "1")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from lmtrain.runtime import apply_xla_defaults  # noqa: E402

apply_xla_defaults()  # as the `lmtrain` command does, before JAX starts


def lmtrain_side(model, prompts, batch: int, new_tokens: int, repeats: int) -> dict:
    from lmtrain.tasks.generation_eval import Generator

    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.tokenizer.eos_token_id
    generator = Generator(model.model_def, max(len(p) for p in prompts), new_tokens, batch, None, pad)
    out = generator(model.params, prompts)  # the first batch compiles
    best = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = generator(model.params, prompts)
        best = time.perf_counter() - t0 if best is None else min(best, time.perf_counter() - t0)
    return {"tokens": out, "seconds": best, "first_call_s": generator.stats.compile_seconds,
            "tok_s": len(prompts) * new_tokens / best}


def torch_side(hf_dir: str, prompts, batch: int, new_tokens: int, repeats: int, pad_id: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32, trust_remote_code=False).eval()
    # no stop at EOS, as on lmtrain's side (min_new_tokens would instead forbid EOS and change the greedy tokens)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = pad_id
    width = max(len(p) for p in prompts)

    def run():
        out = []
        for start in range(0, len(prompts), batch):
            chunk = prompts[start:start + batch]
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, p in enumerate(chunk):  # left padding, as lmtrain pads
                ids[r, width - len(p):] = torch.tensor(p)
                mask[r, width - len(p):] = 1
            with torch.inference_mode():
                gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                                     use_cache=True)
            out += gen[:, width:].tolist()
        return out

    t0 = time.perf_counter()
    out = run()  # the first call: allocations, lazy initialisation
    first = time.perf_counter() - t0
    best = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = run()
        best = time.perf_counter() - t0 if best is None else min(best, time.perf_counter() - t0)
    return {"tokens": out, "seconds": best, "first_call_s": first, "tok_s": len(prompts) * new_tokens / best,
            "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="an lmtrain WORKDIR with a language-model head (lm or sft)")
    parser.add_argument("--data", required=True, help="sft shards whose prompts to generate from")
    parser.add_argument("--which", default="latest")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    import jax
    import numpy as np
    import transformers

    from lmtrain.evaluate.examples import encode, read_eval_set
    from lmtrain.evaluate.model import load_eval_model
    from lmtrain.interop.hf_export import export_workdir

    which = int(args.which) if args.which.isdigit() else args.which
    model = load_eval_model(args.workdir, which, (1, 1, 1))
    cfg = model.model_def.cfg
    eval_set = read_eval_set(args.data, None, args.examples)
    enc = encode(eval_set, model.tokenizer, model.tokenizer_dir, cfg.vocab_size, cfg.max_seq_len + 1)
    prompts = [p.tolist() for p in enc.prompts]
    width = max(len(p) for p in prompts)
    new_tokens = min(args.new_tokens, cfg.max_seq_len - width)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.tokenizer.eos_token_id
    print(f"# {model.path} ({model.checkpoint}), {sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model.params)) / 1e6:.2f}M "
          f"parameters; {len(prompts)} prompts of {min(map(len, prompts))}-{width} tokens from {eval_set.describe()}, "
          f"{new_tokens} new tokens each, greedy")
    print(f"# jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} device), transformers "
          f"{transformers.__version__}, {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = str(export_workdir(args.workdir, pathlib.Path(tmp) / "hf", which))
        rows = []
        for batch in args.batch:
            ours = lmtrain_side(model, [np.asarray(p, np.int32) for p in prompts], batch, new_tokens, args.repeats)
            theirs = torch_side(hf_dir, prompts, batch, new_tokens, args.repeats, pad)
            same = sum(a == b for a, b in zip(ours["tokens"], theirs["tokens"]))
            rows.append((batch, ours, theirs, same))
    print("\n| batch | lmtrain tok/s (KV cache) | lmtrain compile s | transformers tok/s | transformers first call s "
          "| speed-up | identical greedy outputs |")
    print("|---|---|---|---|---|---|---|")
    for batch, ours, theirs, same in rows:
        print(f"| {batch} | {ours['tok_s']:.0f} | {ours['first_call_s']:.1f} | {theirs['tok_s']:.0f} | "
              f"{theirs['first_call_s']:.2f} | {ours['tok_s'] / theirs['tok_s']:.2f}x | {same}/{len(prompts)} |")
    print(f"\n(torch threads: {rows[0][2]['threads']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
