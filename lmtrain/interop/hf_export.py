"""`lmtrain export WORKDIR OUT_DIR`: a WORKDIR checkpoint becomes a Hugging Face model directory.

OUT_DIR gets config.json, safetensors (sharded with an index above --max-shard-size), generation_config.json
and the tokenizer, and loads as it is with `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`.
Tensors stream one at a time from the devices into files whose headers are written first, so the host
never holds more than one tensor.

Nothing the user had is lost and a half export never looks complete:
- the export is written into a hidden sibling, `.OUT.export-tmp-*`, and renamed to OUT only once whole;
- a non-empty OUT is refused without --force; with --force the old directory is moved aside, the new
  one renamed in, and the old one removed only then (an export interrupted between the two renames is
  undone by the next export, which moves the old directory back);
- on object stores (gs://, s3://) there is no directory rename: the files are copied from the
  temporary prefix with config.json last, so a directory without config.json is an unfinished export.

The parameters are restored sharded over the WORKDIR's training mesh, so a model larger than one device
(or one host) exports: every process takes part in gathering one tensor at a time, and process 0 writes.

Launch:  lmtrain export WORKDIR OUT_DIR [--which latest|best|STEP] [--dtype float32|bfloat16] [--force]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
import time

import jax
import numpy as np
from etils import epath

from lmtrain.config import ConfigError
from lmtrain.data.packing import DataError
from lmtrain.data.tokenizer import load_tokenizer
from lmtrain.interop import lora_export
from lmtrain.interop.export_common import (
    COMPLETE_MARKER,
    DTYPES,
    PUBLISHER,
    agree_on_target,
    check_dtype,
    layer_of,
    new_staging_dir,
    to_host,
)
from lmtrain.interop.families import FAMILIES, Family, HFInteropError, family_for_model
from lmtrain.interop.hf_import import (
    SOURCE_CONFIG,
    SOURCE_GENERATION_CONFIG,
    TOKENIZER_FILES,
    read_json,
)
from lmtrain.model import build_model_def
from lmtrain.model.layers import ModelConfig
from lmtrain.paths import as_path, is_remote
from lmtrain.storage.safetensors import write_safetensors
from lmtrain.workdir import Workdir, place_on_mesh, workdir_model_config

# Source config keys that lmtrain's model does not determine and that survive an import/export round trip.
_CARRIED_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "_name_or_path")
_EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "<|end_of_text|>", "<|im_end|>")
# Tokens chat templates write after each message (ChatML, Llama 3, Gemma, Phi-3): a reply ends at one.
END_OF_TURN_NAMES = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|eot|>")


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a plain byte count."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?i?B?)\s*", text, re.IGNORECASE)
    if not m:
        raise HFInteropError(f"--max-shard-size={text!r}: write a size such as 5GB, 500MB or 1000000.")
    unit = m.group(2).upper().rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    size = int(float(m.group(1)) * base**power)
    if size <= 0:
        raise HFInteropError(f"--max-shard-size={text!r}: the size must be positive.")
    return size


def _param(params: dict, path: str) -> jax.Array:
    node = params
    for key in path.split("/"):
        node = node[key]
    return node


def _tensor_plan(cfg: ModelConfig, family: Family) -> list[tuple[str, object, int | None]]:
    """(HF name, rule, layer) in the order the tensors are written."""
    plan = []
    for rule in family.rules(cfg):
        for layer in range(rule.n_layers(cfg)) if rule.per_layer else [None]:
            plan.append((rule.hf_name(layer), rule, layer))
    return plan


def _hf_config(cfg: ModelConfig, family: Family, source: dict, dtype: str, token_ids: dict,
               labels: list[str] | None = None) -> dict:
    out = {k: source[k] for k in _CARRIED_KEYS if k in source}
    out.update({k: v for k, v in token_ids.items() if v is not None and out.get(k) is None})
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        out.setdefault(key, None)  # unknown ids stay unset rather than taking a family default (GPT-2's 50256)
    out.update(family.config_to_hf(cfg))
    out.update(architectures=[family.architecture(cfg)], dtype=dtype, torch_dtype=dtype, use_cache=True)
    if cfg.head == "classify":
        labels = class_labels(cfg, labels)
        out.update(id2label={str(i): name for i, name in enumerate(labels)},
                   label2id={name: i for i, name in enumerate(labels)})
        if out["pad_token_id"] is None and out["eos_token_id"] is not None:
            # transformers pools the rightmost token that is not pad_token_id, and refuses batches without one.
            out["pad_token_id"] = out["eos_token_id"]
            print(f"lmtrain export: note: the tokenizer has no pad token, so config.json sets pad_token_id to the "
                  f"EOS id {out['eos_token_id']}; transformers then classifies from the last token that is not EOS.",
                  file=sys.stderr)
    if cfg.head == "token_classify":
        labels = class_labels(cfg, labels)
        out.update(id2label={str(i): name for i, name in enumerate(labels)},
                   label2id={name: i for i, name in enumerate(labels)})
    return out


def class_labels(cfg: ModelConfig, labels: list[str] | None) -> list[str]:
    """The classifier's label names in class order (LABEL_i when none are known), checked against the head."""
    if labels is None:
        return [f"LABEL_{i}" for i in range(cfg.num_labels)]
    labels = [str(name) for name in labels]
    if len(labels) != cfg.num_labels or len(set(labels)) != len(labels):
        raise HFInteropError(f"the classifier has {cfg.num_labels} classes, but the labels given are {labels}; "
                             "give one distinct name per class, in class order.")
    return labels


@contextlib.contextmanager
def _local_dir(directory: epath.Path):
    """`directory` as a local path transformers can read: itself, or a temporary copy of its tokenizer files."""
    if not is_remote(directory):
        yield str(directory)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for name in TOKENIZER_FILES:
            if (directory / name).is_file():
                (directory / name).copy(epath.Path(tmp) / name)
        yield tmp


def _export_tokenizer(tokenizer_dir: epath.Path | None, out_dir: epath.Path, chat_template: str | None = None) -> dict:
    """Save the tokenizer into out_dir in the form AutoTokenizer loads, with `chat_template` (the one the model was
    trained with) as its chat template; return its special token ids and the ids of the template's end-of-turn
    tokens ('end_of_turn_ids')."""
    if tokenizer_dir is None or not tokenizer_dir.is_dir():
        return {}
    from transformers import PreTrainedTokenizerFast

    with _local_dir(tokenizer_dir) as source, tempfile.TemporaryDirectory() as saved:
        try:
            tok = load_tokenizer(tokenizer_dir)  # lmtrain's one loader: no code from the directory
        except DataError as e:  # no tokenizer files, or a tokenizer that needs its own code: the user's to fix
            raise HFInteropError(f"{e} Then export again.") from None
        except Exception:  # noqa: BLE001 - a bare tokenizer.json (as lmtrain trains) has no tokenizer_config.json
            if not os.path.isfile(os.path.join(source, "tokenizer.json")):
                raise HFInteropError(
                    f"{tokenizer_dir}: neither a transformers tokenizer nor a tokenizer.json; cannot export it. "
                    "Fix or remove that directory (config data.tokenizer_dir) and export again."
                ) from None
            try:
                tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(source, "tokenizer.json"))
            except Exception as e:  # noqa: BLE001 - a corrupt tokenizer.json is the user's file, not a bug
                raise HFInteropError(f"{tokenizer_dir}/tokenizer.json cannot be read ({_first_line(e)}); fix or "
                                     "remove it (config data.tokenizer_dir) and export again.") from None
            vocab = tok.get_vocab()
            eos = next((t for t in _EOS_NAMES if t in vocab), None)
            if eos is not None:
                tok.eos_token = eos
                tok.bos_token = tok.bos_token or eos
        if chat_template:
            tok.chat_template = chat_template
        tok.save_pretrained(saved)
        extra = os.path.join(source, "chat_template.jinja")
        if chat_template:
            _write_chat_template(saved, chat_template)
        elif os.path.isfile(extra) and not os.path.exists(os.path.join(saved, "chat_template.jinja")):
            shutil.copy2(extra, os.path.join(saved, "chat_template.jinja"))
        for name in sorted(os.listdir(saved)):
            epath.Path(saved, name).copy(out_dir / name, overwrite=True)
        template = chat_template or getattr(tok, "chat_template", None)
        vocab = tok.get_vocab()
        end_of_turn = [vocab[name] for name in end_of_turn_tokens(template if isinstance(template, str) else None,
                                                                  vocab.get)]
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
            "end_of_turn_ids": end_of_turn}


def _write_chat_template(saved: str, template: str) -> None:
    """The chat template both where transformers 4 reads it (tokenizer_config.json's chat_template) and where
    transformers 5 writes and prefers it (chat_template.jinja): the same text in both, so neither can disagree."""
    config_path = os.path.join(saved, "tokenizer_config.json")
    config = json.loads(open(config_path, encoding="utf-8").read()) if os.path.isfile(config_path) else {}
    config["chat_template"] = template
    with open(config_path, "w", encoding="utf-8") as f:
        f.write(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    with open(os.path.join(saved, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(template)


def end_of_turn_tokens(template: str | None, token_id) -> list[str]:
    """The end-of-turn tokens a chat template writes that are single tokens of the vocabulary (`token_id(text)`
    gives a token's id, or None)."""
    if not template:
        return []
    return [name for name in END_OF_TURN_NAMES if name in template and token_id(name) is not None]


def shards_chat_template(shards_dir) -> str | None:
    """The chat template the shards were made with: manifest.json's `chat_template` (or, as tools/shard_data.py
    records it, its fingerprint's); None for shards of another format or a directory that is not there."""
    path = as_path(shards_dir) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict):
        return None
    fingerprint = manifest.get("fingerprint") if isinstance(manifest.get("fingerprint"), dict) else {}
    template = manifest.get("chat_template") or fingerprint.get("chat_template")
    return template if isinstance(template, str) and template else None


def workdir_chat_template(workdir) -> str | None:
    """The chat template a WORKDIR trained with (its data.shards_dir's); None for a Hugging Face directory or a
    run on other data."""
    try:
        raw = json.loads((as_path(workdir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    data = raw.get("data") if isinstance(raw, dict) else None
    shards_dir = data.get("shards_dir") if isinstance(data, dict) else None
    return shards_chat_template(shards_dir) if isinstance(shards_dir, str) and shards_dir else None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# ---------------------------------------------------------------------------------------------- the target


# ---------------------------------------------------------------------------------------------- export


def export_params(cfg: ModelConfig, params: dict, out_dir: str | os.PathLike, *, source_config: dict | None = None,
                  generation_config: dict | None = None, tokenizer_dir: str | os.PathLike | None = None,
                  dtype: str = "float32", max_shard_bytes: int = 5 * 10**9, force: bool = False,
                  labels: list[str] | None = None, chat_template: str | None = None) -> epath.Path:
    """Write `params` (an lmtrain params dict, possibly sharded over hosts) as a Hugging Face model directory:
    a *ForCausalLM for the 'lm' head, a *ForSequenceClassification with id2label/label2id from `labels` (names
    in class order) for the 'classify' head. `chat_template` (the template the model was trained with) becomes the
    tokenizer's, and its end-of-turn token an EOS id of generation_config.json.

    Every process must call this; process 0 writes.
    """
    out_dir = as_path(out_dir)
    if cfg.lora_rank:  # a LoRA model exports as the ordinary model it computes: adapters merged into their weights
        cfg, params = lora_export.merge_adapters(cfg, params)
    source_config = source_config or {}
    family = family_for_model(cfg, imported_family(source_config))
    check_dtype(dtype)
    if cfg.head in ("classify", "token_classify"):
        labels = class_labels(cfg, labels)
    np_dtype, code = DTYPES[dtype]
    itemsize = np.dtype(np_dtype).itemsize
    is_main = jax.process_index() == 0
    agree_on_target(out_dir, force)

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
            parts.append(to_host(layer_of(_param(params, path), layer)))
        return rule.to_hf(tuple(parts)).astype(np_dtype)

    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    if not is_main:  # the other hosts still take part in gathering arrays spread over hosts
        for items in shards:
            for item in items:
                produce(item)
        return out_dir

    with PUBLISHER.staged(out_dir, new_staging_dir(out_dir)) as staging:  # a failed export leaves no trace
        weight_map = {}
        for name, items in zip(names, shards, strict=True):
            entries = [(hf_name, code, rule.hf_shape) for hf_name, rule, _ in items]
            write_safetensors(staging / name, entries, map(produce, items), {"format": "pt"})
            weight_map.update({item[0]: name for item in items})
        if len(shards) > 1:
            total = sum(int(np.prod(item[1].hf_shape)) * itemsize for item in plan)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        token_ids = _export_tokenizer(as_path(tokenizer_dir) if tokenizer_dir else None, staging, chat_template)
        end_of_turn = token_ids.pop("end_of_turn_ids", [])
        config = _hf_config(cfg, family, source_config, dtype, token_ids, labels)
        gen = generation_settings(generation_config, config, end_of_turn)
        (staging / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True))
        (staging / COMPLETE_MARKER).write_text(json.dumps(config, indent=2, sort_keys=True))  # last: marks it whole
    return out_dir


def imported_family(source_config: dict | None) -> str | None:
    """The family a WORKDIR was imported from (its hf_config.json's model_type), which export prefers."""
    model_type = (source_config or {}).get("model_type")
    return model_type if isinstance(model_type, str) and model_type in FAMILIES else None


def generation_settings(source: dict | None, config: dict, end_of_turn: list[int]) -> dict:
    """generation_config.json: the source model's, with the config's special token ids where it has none, and a
    chat model's end-of-turn tokens as EOS ids next to the EOS (transformers stops at any id of the list)."""
    gen = dict(source or {})
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if gen.get(key) is None and config.get(key) is not None:
            gen[key] = config[key]
    if end_of_turn:
        eos = gen.get("eos_token_id")
        ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
        ids = list(dict.fromkeys([*ids, *end_of_turn]))
        gen["eos_token_id"] = ids[0] if len(ids) == 1 else ids
    return {k: v for k, v in gen.items() if v is not None}


def export_shardings(cfg, workdir, mesh_shape: tuple[int, int, int] | None = None):
    """The params' shardings on the WORKDIR's training mesh (or on `mesh_shape`); None means one device.

    A single process whose devices do not fit the training mesh (a model trained on a pod, exported on a
    workstation) restores onto one device instead, with a note.
    """
    model_def = build_model_def(workdir_model_config(cfg, workdir))
    try:
        return place_on_mesh(model_def, cfg.mesh, cfg.mesh.axis_rules, mesh_shape, "the WORKDIR",
                             "lmtrain export")[1]
    except ConfigError as e:
        raise HFInteropError(str(e)) from None


def export_workdir(workdir: str | os.PathLike, out_dir: str | os.PathLike, which: str | int = "latest",
                   dtype: str = "float32", max_shard_bytes: int = 5 * 10**9, force: bool = False,
                   mesh_shape: tuple[int, int, int] | None = None, adapter: bool = False, base: bool = False,
                   base_model: str | None = None) -> epath.Path:
    """Export WORKDIR's checkpoint `which` ('latest', 'best' or a step number).

    A LoRA run exports with its adapters merged; `adapter` writes them as a PEFT adapter directory instead (with
    `base_model` as its base_model_name_or_path), and `base` writes the base model they apply to.

    The parameters are restored sharded over the WORKDIR's training mesh; `mesh_shape` (data, fsdp, tensor)
    overrides it, and (1, 1, 1) restores onto one device. Every process of a multi-host job must call this.
    """
    work = Workdir(workdir)
    workdir = work.path
    out = as_path(out_dir)
    try:
        work.require_config_file()
        if out == workdir or workdir.is_relative_to(out):
            raise HFInteropError(f"{out} holds the WORKDIR {workdir}; export into a directory of its own "
                                 f"(for example {workdir / 'hf'}).")
        agree_on_target(out, force)  # the output is the user's first mistake to name, before any checkpoint
        work.select_step(which)  # a WORKDIR with this checkpoint, checked before the restore and anything written
        cfg, model_cfg = work.config, work.model_config()
        params = work.load_params(which, export_shardings(cfg, workdir, mesh_shape))
        labels = work.labels() if model_cfg.head in ("classify", "token_classify") else None
        trained = work.trained_paths(which) if adapter else None
    except (FileNotFoundError, ConfigError) as e:
        raise HFInteropError(str(e)) from None
    source = workdir / SOURCE_CONFIG
    generation = workdir / SOURCE_GENERATION_CONFIG
    tokenizer_dir = work.tokenizer_dir
    if adapter or base:
        if not model_cfg.lora_rank:
            raise HFInteropError(f"{workdir} is not a LoRA run (model.lora_rank=0): it has no adapters and no separate "
                                 "base; export the whole model without --adapter or --base.")
        if adapter:
            source_config = read_json(source) if source.is_file() else None
            return lora_export.export_adapter(
                model_cfg, params, out, trained=trained,
                base_model=base_model or lora_export.default_base_model(workdir, source_config),
                source_config=source_config, dtype=dtype, force=force)
        model_cfg, params = lora_export.without_adapters(model_cfg, params)
    return export_params(
        model_cfg,
        params,
        out,
        source_config=read_json(source) if source.is_file() else None,
        generation_config=read_json(generation) if generation.is_file() else None,
        tokenizer_dir=tokenizer_dir if any((tokenizer_dir / n).is_file() for n in TOKENIZER_FILES) else None,
        dtype=dtype,
        max_shard_bytes=max_shard_bytes,
        force=force,
        labels=labels,
        chat_template=workdir_chat_template(workdir),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lmtrain export", description="Export a WORKDIR checkpoint as a Hugging Face model directory."
    )
    parser.add_argument("workdir", help="lmtrain WORKDIR with checkpoints/")
    parser.add_argument("out_dir", help="directory to create (config.json, safetensors, tokenizer); must be empty")
    parser.add_argument("--which", default="latest", help="'latest', 'best' (the checkpoint with the best value of "
                        "the run's train.early_stopping.metric: the lowest val_loss unless the run set another, such "
                        "as val_accuracy) or a step number")
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="dtype of the written weights")
    parser.add_argument("--max-shard-size", default="5GB", help="split the safetensors above this size")
    parser.add_argument("--force", action="store_true",
                        help="replace an earlier export in OUT_DIR (only once the new one is complete)")
    lora = parser.add_mutually_exclusive_group()
    lora.add_argument("--adapter", action="store_true",
                      help="a LoRA run: write its adapters as a PEFT adapter directory (default: merged into the model)")
    lora.add_argument("--base", action="store_true", help="a LoRA run: write the base model its adapters apply to")
    parser.add_argument("--base-model", default=None,
                        help="with --adapter: base_model_name_or_path for adapter_config.json (a hub name or directory)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    which = int(args.which) if args.which.isdigit() else args.which
    if which not in ("latest", "best") and not isinstance(which, int):
        parser.error(f"--which={args.which}: use 'latest', 'best' or a step number")
    start = time.perf_counter()
    try:
        out = export_workdir(args.workdir, args.out_dir, which, args.dtype, parse_size(args.max_shard_size),
                             force=args.force, adapter=args.adapter, base=args.base, base_model=args.base_model)
    except HFInteropError as e:
        print(f"lmtrain export: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only or full disk, a permission: the user's to fix, not a bug
        print(f"lmtrain export: error: {e.filename or args.out_dir}: {e.strerror or e}. Nothing was published; "
              "fix that and export again.", file=sys.stderr)
        return 2
    written = json.loads((as_path(out) / "config.json").read_text()).get("architectures", []) if not args.adapter \
        and (as_path(out) / "config.json").exists() else []
    loader = "AutoModelForCausalLM" if not written or written[0].endswith("LMHeadModel") or \
        written[0].endswith("ForCausalLM") else f"{written[0]}"
    load = (f"peft.PeftModel.from_pretrained(base_model, {str(out)!r})" if args.adapter else
            f"transformers.{loader}.from_pretrained({str(out)!r})")
    print(f"lmtrain export: exported {Workdir(args.workdir).describe(which)} of {args.workdir} -> {out} in "
          f"{time.perf_counter() - start:.1f}s. Load with {load}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
