"""`lmtrain export WORKDIR OUT_DIR`: a WORKDIR checkpoint becomes a Hugging Face model directory.

OUT_DIR gets config.json, safetensors (sharded with an index above --max-shard-size), generation_config.json
and the tokenizer, and loads as it is with `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`.
Tensors stream one at a time from the devices into files whose headers are written first, so the host
never holds more than one tensor.

Launch:  lmtrain export WORKDIR OUT_DIR [--which latest|best|STEP] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import shutil
import struct
import sys
import time

import jax
import ml_dtypes
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lmtrain.interop.hf_families import Family, HFInteropError, family_for_model
from lmtrain.interop.hf_import import SOURCE_CONFIG, SOURCE_GENERATION_CONFIG, TOKENIZER_FILES
from lmtrain.model.layers import ModelConfig

DTYPES = {"float32": (np.float32, "F32"), "bfloat16": (ml_dtypes.bfloat16, "BF16"), "float16": (np.float16, "F16")}
# Source config keys that lmtrain's model does not determine and that survive an import/export round trip.
_CARRIED_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "_name_or_path")
_EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "<|end_of_text|>", "<|im_end|>")


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a plain byte count."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?i?B?)\s*", text, re.IGNORECASE)
    if not m:
        raise HFInteropError(f"--max-shard-size={text!r}: write a size such as 5GB, 500MB or 1000000.")
    unit = m.group(2).upper().rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    return int(float(m.group(1)) * base**power)


def _to_host(x: jax.Array) -> np.ndarray:
    """A whole array on this host; arrays spread over several hosts are gathered first."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    mesh = x.sharding.mesh
    replicated = jax.jit(lambda a: a, out_shardings=NamedSharding(mesh, PartitionSpec()))(x)
    return np.asarray(replicated.addressable_data(0))


def _param(params: dict, path: str) -> jax.Array:
    node = params
    for key in path.split("/"):
        node = node[key]
    return node


def _tensor_plan(cfg: ModelConfig, family: Family) -> list[tuple[str, object, int | None]]:
    """(HF name, rule, layer) in the order the tensors are written."""
    plan = []
    for rule in family.rules(cfg):
        for layer in range(cfg.n_layers) if rule.per_layer else [None]:
            plan.append((rule.hf_name(layer), rule, layer))
    return plan


def _write_safetensors(path: pathlib.Path, items: list, produce, dtype_code: str, itemsize: int) -> None:
    """Write a safetensors file whose header is known up front; `produce(item)` makes one tensor at a time."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, rule, _ in items:
        nbytes = int(np.prod(rule.hf_shape)) * itemsize
        header[name] = {"dtype": dtype_code, "shape": list(rule.hf_shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for item in items:
            tensor = produce(item)
            if tuple(tensor.shape) != item[1].hf_shape:
                raise AssertionError(f"{item[0]}: produced {tensor.shape}, planned {item[1].hf_shape}")
            f.write(np.ascontiguousarray(tensor).tobytes())


def _hf_config(cfg: ModelConfig, family: Family, source: dict, dtype: str, token_ids: dict) -> dict:
    out = {k: source[k] for k in _CARRIED_KEYS if k in source}
    out.update({k: v for k, v in token_ids.items() if v is not None and out.get(k) is None})
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        out.setdefault(key, None)  # unknown ids stay unset rather than taking a family default (GPT-2's 50256)
    out.update(family.config_to_hf(cfg))
    out.update(dtype=dtype, torch_dtype=dtype, use_cache=True)
    return out


def _export_tokenizer(tokenizer_dir: pathlib.Path | None, out_dir: pathlib.Path) -> dict:
    """Save the tokenizer into out_dir in the form AutoTokenizer loads; return its special token ids."""
    if tokenizer_dir is None or not tokenizer_dir.is_dir():
        return {}
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True, trust_remote_code=False)
    except Exception:  # noqa: BLE001 - a bare tokenizer.json (as lmtrain trains) has no tokenizer_config.json
        if not (tokenizer_dir / "tokenizer.json").is_file():
            raise HFInteropError(
                f"{tokenizer_dir}: neither a transformers tokenizer nor a tokenizer.json; cannot export it."
            ) from None
        tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"))
        vocab = tok.get_vocab()
        eos = next((t for t in _EOS_NAMES if t in vocab), None)
        if eos is not None:
            tok.eos_token = eos
            tok.bos_token = tok.bos_token or eos
    tok.save_pretrained(str(out_dir))
    for name in ("chat_template.jinja",):
        if (tokenizer_dir / name).is_file() and not (out_dir / name).exists():
            shutil.copy2(tokenizer_dir / name, out_dir / name)
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}


def export_params(cfg: ModelConfig, params: dict, out_dir: str | pathlib.Path, *, source_config: dict | None = None,
                  generation_config: dict | None = None, tokenizer_dir: str | pathlib.Path | None = None,
                  dtype: str = "float32", max_shard_bytes: int = 5 * 10**9) -> pathlib.Path:
    """Write `params` (an lmtrain params dict) as a Hugging Face model directory."""
    out_dir = pathlib.Path(out_dir)
    source_config = source_config or {}
    preferred = next((f for f in ("gpt2", "llama", "mistral", "qwen2")
                      if source_config.get("model_type") == f), None)
    family = family_for_model(cfg, preferred)
    if dtype not in DTYPES:
        raise HFInteropError(f"--dtype={dtype}: choose one of {', '.join(DTYPES)}.")
    np_dtype, code = DTYPES[dtype]
    itemsize = np.dtype(np_dtype).itemsize
    is_main = jax.process_index() == 0
    out_dir.mkdir(parents=True, exist_ok=True)

    plan = _tensor_plan(cfg, family)
    shards: list[list] = [[]]
    size = 0
    for item in plan:
        nbytes = int(np.prod(item[1].hf_shape)) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes

    def produce(item) -> np.ndarray:
        _, rule, layer = item
        parts = []
        for path in rule.lm:
            value = _param(params, path)
            parts.append(_to_host(value if layer is None else value[layer]))
        return rule.to_hf(tuple(parts)).astype(np_dtype)

    for stale in list(out_dir.glob("model*.safetensors")) + list(out_dir.glob("model.safetensors.index.json")):
        if is_main:
            stale.unlink()
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    weight_map = {}
    for name, items in zip(names, shards, strict=True):
        if is_main:
            _write_safetensors(out_dir / name, items, produce, code, itemsize)
        else:  # the other hosts still take part in gathering arrays spread over hosts
            for item in items:
                produce(item)
        weight_map.update({item[0]: name for item in items})

    if not is_main:
        return out_dir
    if len(shards) > 1:
        total = sum(int(np.prod(item[1].hf_shape)) * itemsize for item in plan)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    token_ids = _export_tokenizer(pathlib.Path(tokenizer_dir) if tokenizer_dir else None, out_dir)
    config = _hf_config(cfg, family, source_config, dtype, token_ids)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    gen = dict(generation_config or {})
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if gen.get(key) is None and config.get(key) is not None:
            gen[key] = config[key]
    gen = {k: v for k, v in gen.items() if v is not None}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True))
    return out_dir


def export_workdir(workdir: str | pathlib.Path, out_dir: str | pathlib.Path, which: str | int = "latest",
                   dtype: str = "float32", max_shard_bytes: int = 5 * 10**9) -> pathlib.Path:
    """Export WORKDIR's checkpoint `which` ('latest', 'best' or a step number)."""
    from lmtrain.train.checkpoint import restore_params

    workdir = pathlib.Path(workdir)
    if not (workdir / "config.json").is_file():
        raise HFInteropError(f"{workdir} has no config.json; is it an lmtrain WORKDIR?")
    try:
        cfg, params = restore_params(workdir, which)
    except FileNotFoundError as e:
        raise HFInteropError(str(e)) from None
    source = workdir / SOURCE_CONFIG
    generation = workdir / SOURCE_GENERATION_CONFIG
    tokenizer_dir = pathlib.Path(cfg.data.tokenizer_dir) if cfg.data.tokenizer_dir else workdir / "tokenizer"
    return export_params(
        ModelConfig.from_config(cfg.model),
        params,
        out_dir,
        source_config=json.loads(source.read_text()) if source.is_file() else None,
        generation_config=json.loads(generation.read_text()) if generation.is_file() else None,
        tokenizer_dir=tokenizer_dir if any((tokenizer_dir / n).is_file() for n in TOKENIZER_FILES) else None,
        dtype=dtype,
        max_shard_bytes=max_shard_bytes,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lmtrain export", description="Export a WORKDIR checkpoint as a Hugging Face model directory."
    )
    parser.add_argument("workdir", help="lmtrain WORKDIR with checkpoints/")
    parser.add_argument("out_dir", help="directory to write (config.json, safetensors, tokenizer)")
    parser.add_argument("--which", default="latest", help="'latest', 'best' (lowest validation loss) or a step")
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="dtype of the written weights")
    parser.add_argument("--max-shard-size", default="5GB", help="split the safetensors above this size")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    which = int(args.which) if args.which.isdigit() else args.which
    if which not in ("latest", "best") and not isinstance(which, int):
        parser.error(f"--which={args.which}: use 'latest', 'best' or a step number")
    start = time.perf_counter()
    try:
        out = export_workdir(args.workdir, args.out_dir, which, args.dtype, parse_size(args.max_shard_size))
    except HFInteropError as e:
        print(f"lmtrain export: error: {e}", file=sys.stderr)
        return 2
    print(f"lmtrain export: {args.workdir} ({args.which}) -> {out} in {time.perf_counter() - start:.1f}s. Load with "
          f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
