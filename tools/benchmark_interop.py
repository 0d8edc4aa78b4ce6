"""Time `lmtrain import` / `lmtrain export` and generation with and without the KV cache.

A random GPT-2 of the chosen shape is built locally with transformers (no download) and saved as
safetensors; the figures are wall-clock seconds on whatever JAX backend is present.

    python tools/benchmark_interop.py                      # gpt2_small shape (124M)
    python tools/benchmark_interop.py --size tiny          # seconds, for a smoke test
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LMTRAIN_SINGLE_HOST", "1")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

SIZES = {  # GPT2Config fields
    "gpt2_small": dict(vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_inner=3072, n_positions=1024),
    "tiny": dict(vocab_size=1000, n_embd=128, n_layer=2, n_head=4, n_inner=512, n_positions=256, bos_token_id=0,
                 eos_token_id=0),
}


def _save_random_gpt2(size: str, directory: pathlib.Path) -> int:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**SIZES[size]))
    model.save_pretrained(str(directory))
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=tuple(SIZES), default="gpt2_small")
    parser.add_argument("--batch", type=int, default=1, help="prompts per generation batch")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--skip-generate", action="store_true")
    args = parser.parse_args(argv)

    import jax
    import numpy as np

    from lmtrain.interop.hf_export import export_params
    from lmtrain.interop.hf_import import import_hf, load_hf_model
    from lmtrain.model import ModelDef
    from lmtrain.model.decode import SamplingConfig, generate

    print(f"backend: {jax.default_backend()}, {jax.device_count()} device(s), {os.cpu_count()} CPU cores")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        n = _save_random_gpt2(args.size, tmp / "hf")
        print(f"model: random GPT-2, {args.size} shape, {n / 1e6:.1f}M parameters, float32 safetensors")

        start = time.perf_counter()
        cfg, params = load_hf_model(tmp / "hf")
        jax.block_until_ready(params)
        print(f"import, weights to device arrays:          {time.perf_counter() - start:6.2f} s")
        start = time.perf_counter()
        import_hf(tmp / "hf", tmp / "work")
        print(f"lmtrain import (+ config, orbax init_params): {time.perf_counter() - start:6.2f} s")
        start = time.perf_counter()
        export_params(cfg, params, tmp / "export")
        print(f"lmtrain export (safetensors + config):      {time.perf_counter() - start:6.2f} s")

        if args.skip_generate:
            return 0
        model_def = ModelDef(cfg)
        rs = np.random.RandomState(0)
        prompts = [rs.randint(0, cfg.vocab_size, args.prompt_len).tolist() for _ in range(args.batch)]
        sampling = SamplingConfig(max_new_tokens=args.new_tokens)
        print(f"generation: batch {args.batch}, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy")
        for use_cache in (True, False):
            result = generate(model_def, params, prompts, sampling, use_cache=use_cache)
            print(f"  KV cache {'on ' if use_cache else 'off'}: {result.tokens_per_second:8.1f} tokens/s "
                  f"({result.new_tokens} tokens in {result.seconds:.2f} s; compile {result.compile_seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
