"""`lmtrain import HF_DIR WORKDIR`: a Hugging Face checkpoint becomes an lmtrain WORKDIR that `lmtrain train` continues.

The weights stream tensor by tensor from safetensors into (possibly sharded) device arrays: a host holds
one HF tensor at a time and each device receives only its slice. Pickle checkpoints (`pytorch_model.bin`)
are refused, never opened, and no code from the model directory is ever run.

The WORKDIR's config asks for the user's data: data.source='shards' with data.shards_dir empty and
data.tokenizer_dir at the imported tokenizer, so that training never falls back to the built-in corpus
silently.

Launch:  lmtrain import path/to/hf_model WORKDIR [--fsdp N] [--tensor N]
Then:    python tools/shard_data.py --input 'data/*.jsonl' --tokenizer WORKDIR/tokenizer --output WORKDIR/shards
         lmtrain train --config WORKDIR/config.json --workdir WORKDIR --config.data.shards_dir=WORKDIR/shards
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import posixpath
import sys
import tempfile
import time
import uuid

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from lmtrain.config import ConfigError, base_config, resolve_mesh_shape, to_json
from lmtrain.data.tokenizer import load_tokenizer
from lmtrain.interop.families import Family, HFInteropError, TensorRule, classifier_labels, family_for_hf_config
from lmtrain.interop.hf_model import hf_model_dir, model_config_from_hf, place, read_hf_config, read_json
from lmtrain.interop.lora_import import read_peft_adapter, write_source_config
from lmtrain.model import build_model_def, model_config_for
from lmtrain.model.layers import ModelConfig
from lmtrain.model.transformer import ModelDef
from lmtrain.parallel.mesh import make_mesh
from lmtrain.parallel.partitioning import param_shardings
from lmtrain.paths import as_path
from lmtrain.storage.safetensors import SafetensorsReader
from lmtrain.train.checkpoint import save_init_params
from lmtrain.trees import flat_paths, nest_paths
from lmtrain.workdir import LABELS, read_labels

PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "model.ckpt")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
)
# Written next to the checkpoint so that `lmtrain export` returns to the same family and token ids.
SOURCE_CONFIG = "hf_config.json"
SOURCE_GENERATION_CONFIG = "hf_generation_config.json"
# The task an imported encoder's WORKDIR trains, by the head it imported into.
ENCODER_TASKS = {"mlm": "mlm", "pool": "mlm", "token_classify": "token_classify"}

def _check_inside(directory: epath.Path, name: str, what: str) -> None:
    """Refuse a file name (read from a file in `directory`) that leads outside `directory`.

    The check is on the name itself (absolute, '..', a drive or URL scheme), not on where symlinks lead: the
    Hugging Face cache links snapshot files into ../../blobs, and the directory's own links are the user's.
    """
    parts = posixpath.normpath(name.replace("\\", "/")).split("/")
    if not name or posixpath.isabs(name) or ":" in name or parts[0] in ("..", "") or parts == ["."]:
        raise HFInteropError(f"{what} is '{name}', which is not a file inside {directory}; an index may only "
                             "name files in its own directory. Restore the index.")


def safetensors_files(hf_dir: epath.Path) -> list[epath.Path]:
    """The checkpoint's safetensors files (single or sharded). Pickle checkpoints are refused unopened."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise HFInteropError(f"{index}: 'weight_map' must map tensor names to file names. Restore the file.")
        for tensor, name in weight_map.items():
            _check_inside(hf_dir, name, f"{index}: weight_map entry '{tensor}'")
        files = [hf_dir / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise HFInteropError(f"{index} lists {f.name}, which is missing from {hf_dir}.")
        return files
    if (hf_dir / "model.safetensors").is_file():
        return [hf_dir / "model.safetensors"]
    found = sorted(hf_dir.glob("*.safetensors"))
    if found:
        return found
    pickles = [p.name for p in hf_dir.iterdir() if p.name in PICKLE_FILES or p.suffix in (".bin", ".pt", ".pth")]
    if pickles:
        raise HFInteropError(
            f"{hf_dir} holds only a pickle checkpoint ({', '.join(sorted(pickles))}). lmtrain never unpickles "
            "files, since unpickling can run arbitrary code. Convert it to safetensors first, for example in "
            "Python with transformers: AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT) (which "
            "writes model.safetensors), and import OUT."
        )
    raise HFInteropError(f"{hf_dir} has no model.safetensors or model.safetensors.index.json.")


def _check_tensors(reader: SafetensorsReader, family: Family, rules: list[TensorRule], cfg,
                   hf_dir: epath.Path) -> dict[str, str]:
    """Map canonical HF names to the names in the files; every tensor present, none extra, every shape right."""
    present = reader.names()
    prefixed = any(n.startswith(family.base_prefix) for n in present)

    def in_file(canonical: str) -> str:
        return canonical if prefixed or not canonical.startswith(family.base_prefix) else \
            canonical[len(family.base_prefix):]

    expected: dict[str, tuple[str, tuple[int, ...]]] = {}
    for rule in rules:
        for layer in range(rule.n_layers(cfg)) if rule.per_layer else [None]:
            canonical = rule.hf_name(layer)
            expected[canonical] = (in_file(canonical), rule.hf_shape)
    wanted = {name for name, _ in expected.values()}
    missing = [c for c, (name, _) in expected.items() if name not in present]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise HFInteropError(
            f"{hf_dir}: tensor '{missing[0]}' is missing{more}; a {family.name} model with this config.json needs "
            f"it. Missing: {', '.join(missing[:5])}. Check that config.json belongs to these weights."
        )
    optional = {in_file(o) for o in family.optional}
    extra = sorted(n for n in present - wanted - optional if not n.endswith(family.ignored_suffixes))
    if extra:
        raise HFInteropError(
            f"{reader.file_of(extra[0])}: unexpected tensor '{extra[0]}'"
            + (f" (and {len(extra) - 1} more: {', '.join(extra[1:5])})" if len(extra) > 1 else "")
            + f". A {family.name} model with this config.json has no such weight, so importing would lose it. "
            "Check that config.json belongs to these weights."
        )
    for name, shape in expected.values():
        reader.check_dtype(name)
        if reader.shape(name) != shape:
            raise HFInteropError(
                f"{reader.file_of(name)}: tensor '{name}' has shape {list(reader.shape(name))}, but config.json "
                f"implies {list(shape)}. Check that config.json belongs to these weights."
            )
    return {c: name for c, (name, _) in expected.items()}


@functools.cache
def _stacker(sharding):
    return jax.jit(lambda layers: jnp.stack(layers), out_shardings=sharding)


def _layer_sharding(sharding):
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
    return sharding


def read_hf_labels(hf_dir: str | os.PathLike) -> list[str] | None:
    """A *ForSequenceClassification (or *ForTokenClassification) model's label names in class order (`id2label`);
    None for a causal LM."""
    hf_dir = hf_model_dir(hf_dir)
    hf = read_hf_config(hf_dir)
    family = family_for_hf_config(hf, hf.source)
    return classifier_labels(hf) if family.is_classifier(hf) or family.is_token_classifier(hf) else None


def _tensor_reader(hf_dir: epath.Path):
    """read(name): a checkpoint tensor (as numpy), or None when the files do not hold it."""
    reader = SafetensorsReader(safetensors_files(hf_dir), error=HFInteropError)
    names = reader.names()
    return lambda name: reader.read(name) if name in names else None


def checked_checkpoint(hf_dir: epath.Path, cfg: ModelConfig, family: Family) -> tuple[SafetensorsReader, dict[str, str]]:
    """(reader, canonical HF name -> name in the files) once the files, their headers and every tensor's name,
    shape and dtype are checked against `cfg`: what an import refuses, it refuses here, before it writes."""
    reader = SafetensorsReader(safetensors_files(hf_dir), error=HFInteropError)
    return reader, _check_tensors(reader, family, family.rules(cfg), cfg, hf_dir)


def load_hf_params(hf_dir: str | os.PathLike, cfg: ModelConfig, family: Family, shardings=None) -> dict:
    """The params dict of the HF model in `hf_dir`, streamed tensor by tensor onto `shardings` (default: one device).

    Stacked block parameters are built layer by layer on the devices and stacked there, so the host never
    holds more than one HF tensor.
    """
    hf_dir = hf_model_dir(hf_dir)
    model_def = build_model_def(cfg)
    shapes = flat_paths(model_def.shapes)
    if shardings is None:
        shardings = jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[0]), model_def.shapes)
    flat_shardings = flat_paths(shardings)
    rules = family.rules(cfg)
    covered = [p for rule in rules for p in rule.lm]
    if sorted(covered) != sorted(shapes):  # a bug in the family table, not in the user's input
        raise AssertionError(f"{family.name} rules cover {sorted(covered)} but the model has {sorted(shapes)}")
    reader, names = checked_checkpoint(hf_dir, cfg, family)
    dtype = cfg.weight_dtype

    def convert(rule: TensorRule, layer: int | None) -> tuple[np.ndarray, ...]:
        return tuple(x.astype(dtype) for x in rule.to_lm(reader.read(names[rule.hf_name(layer)])))

    params = {}
    for rule in rules:
        if not rule.per_layer:
            for path, host in zip(rule.lm, convert(rule, None), strict=True):
                params[path] = place(host, flat_shardings[path])
            continue
        layers: dict[str, list[jax.Array]] = {p: [] for p in rule.lm}
        for i in range(rule.n_layers(cfg)):
            for path, host in zip(rule.lm, convert(rule, i), strict=True):
                layers[path].append(place(host, _layer_sharding(flat_shardings[path])))
        for path in rule.lm:
            params[path] = _stacker(flat_shardings[path])(layers.pop(path))
    for path, value in params.items():
        want = shapes[path]
        if value.shape != want.shape or value.dtype != want.dtype:
            raise AssertionError(f"{path}: built {value.shape} {value.dtype}, model wants {want.shape} {want.dtype}")
    return nest_paths(params)


def load_hf_model(hf_dir: str | os.PathLike, shardings_fn=None, param_dtype: str = "float32") -> tuple[
        ModelConfig, dict]:
    """(ModelConfig, params) straight from an HF directory, without writing a WORKDIR (used by `lmtrain generate`).

    `shardings_fn(model_def)`, when given, returns the params' shardings.
    """
    family, fields, _ = model_config_from_hf(hf_dir, param_dtype)
    if family.encoder_decoder:
        raise HFInteropError(f"{hf_dir} holds a {family.architectures[0]}, an encoder-decoder; lmtrain generate and "
                             "serve run decoder-only models. Import it (lmtrain import) to fine-tune or evaluate it "
                             "with the seq2seq task.")
    cfg = ModelConfig.from_config(fields)
    shardings = shardings_fn(ModelDef(cfg)) if shardings_fn else None
    return cfg, load_hf_params(hf_dir, cfg, family, shardings)


def _copy_tokenizer(hf_dir: epath.Path, out: epath.Path) -> bool:
    """Copy the tokenizer files; a tokenizer without tokenizer.json is converted by transformers (no remote code)."""
    files = [hf_dir / n for n in TOKENIZER_FILES if (hf_dir / n).is_file()]
    if not files:
        return False
    out.mkdir(parents=True, exist_ok=True)
    for f in files:
        f.copy(out / f.name, overwrite=True)
    if not (out / "tokenizer.json").is_file():
        try:
            with tempfile.TemporaryDirectory() as local:  # transformers reads and writes local paths only
                for f in files:
                    f.copy(epath.Path(local) / f.name)
                load_tokenizer(local).save_pretrained(local)
                epath.Path(local, "tokenizer.json").copy(out / "tokenizer.json", overwrite=True)
        except Exception as e:  # noqa: BLE001 - the weights are still usable; say what is missing
            print(f"lmtrain import: warning: could not build tokenizer.json from {hf_dir} ({e}); the files were "
                  f"copied to {out} as they are.", file=sys.stderr)
    return True


def _check_workdir(hf_dir: epath.Path, workdir: epath.Path, overwrite: bool) -> None:
    """Refuse a WORKDIR whose contents an import would destroy or mix with, before anything is loaded."""
    if workdir.exists() and not workdir.is_dir():
        raise HFInteropError(f"WORKDIR {workdir} is a file; choose a directory to create.")
    if workdir == hf_dir:
        raise HFInteropError(f"WORKDIR {workdir} is the Hugging Face directory itself; import into a new WORKDIR.")
    if (workdir / "checkpoints").is_dir() and any(p.name.isdigit() for p in (workdir / "checkpoints").iterdir()):
        raise HFInteropError(f"WORKDIR {workdir} holds checkpoints/ of a training run, which would resume instead "
                             "of starting from the imported weights; import into a new WORKDIR.")
    if (workdir / "config.json").exists() and not overwrite:
        raise HFInteropError(f"{workdir} already holds a config.json; choose a new WORKDIR or pass --force.")


def _prepare_workdir(workdir: epath.Path) -> bool:
    """Create WORKDIR and prove it writable; True when this import created it (and so owns all of it)."""
    created = not workdir.exists()
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".lmtrain-write-test-{uuid.uuid4().hex}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise HFInteropError(f"cannot write to WORKDIR {workdir} ({e.strerror or e}); choose a writable "
                             "directory.") from None
    return created


def import_hf(hf_dir: str | os.PathLike, workdir: str | os.PathLike, fsdp: int = 1, tensor: int = 1,
              param_dtype: str = "float32", overwrite: bool = False,
              adapter_dir: str | os.PathLike | None = None) -> epath.Path:
    """Write WORKDIR/config.json, WORKDIR/init_params and WORKDIR/tokenizer from the HF model in `hf_dir`.

    With `adapter_dir` (a PEFT LoRA adapter of that model), the WORKDIR continues training the adapter: its
    tensors join init_params as the LoRA parameters and its settings become model.lora_* (lmtrain.interop.lora_import).

    config.json is written last: a WORKDIR without it is an unfinished import, which the next import replaces.
    """
    hf_dir, workdir = hf_model_dir(hf_dir), as_path(workdir)
    is_main = jax.process_index() == 0
    adapter = None
    if adapter_dir is not None:  # checked whole before anything is written
        adapter = read_peft_adapter(adapter_dir, hf_dir)
    _check_workdir(hf_dir, workdir, overwrite)  # every process: each raises alike rather than one hanging
    family, fields, notes = model_config_from_hf(hf_dir, param_dtype)
    for note in notes:
        print(f"lmtrain import: note: {note}")
    if family.settle_config is not None:
        fields = family.settle_config(fields, _tensor_reader(hf_dir))

    head = fields.pop("head", "lm")
    cfg = base_config()
    if head == "classify":
        if "task" not in cfg or "num_labels" not in cfg.model:
            raise HFInteropError(f"{hf_dir} holds a sequence classifier, and this lmtrain has no classify task to "
                                 "train it; import a *ForCausalLM model instead.")
        cfg.task.name = "classify"
    if head in ENCODER_TASKS:  # a bare encoder (the 'pool' head) continues masked-LM pretraining
        cfg.task.name = ENCODER_TASKS[head]
    if family.encoder_decoder:  # input -> target fine-tuning on prompt/completion records
        cfg.model.arch, cfg.task.name = "t5", "seq2seq"
    for key, value in fields.items():
        cfg.model[key] = value
    if adapter is not None:
        adapter.configure(cfg)
        for note in adapter.notes:
            print(f"lmtrain import: note: {note}")
    if "max_seq_len" in fields:  # T5's relative positions have no table to outgrow
        cfg.data.seq_len = min(cfg.data.seq_len, fields["max_seq_len"])
    recipe = FINE_TUNING_RECIPES.get(family.name)
    if recipe:  # the optimizer the model's authors fine-tuned it with (printed by next_steps)
        for key, value in recipe.settings.items():
            cfg.optimizer[key] = value
        cfg.optimizer.warmup_steps = max(1, round(recipe.warmup_fraction * cfg.train.steps))
    # Fine-tuning is on the user's text, tokenized with this model's tokenizer: the trainer stops with a
    # message until data.shards_dir is given, rather than training on the built-in corpus.
    cfg.data.source, cfg.data.shards_dir, cfg.data.tokenizer_dir = "shards", "", ""
    cfg.mesh.fsdp, cfg.mesh.tensor = fsdp, tensor
    cfg.train.init_from = str(workdir / "init_params")
    model_cfg = model_config_for(cfg.model, head)
    model_def = build_model_def(model_cfg)
    try:
        mesh = make_mesh(resolve_mesh_shape(cfg.mesh, jax.device_count()))
        shardings = param_shardings(model_def.logical_axes, mesh, cfg.mesh.axis_rules, model_def.shapes)
    except (ConfigError, ValueError) as e:
        raise HFInteropError(f"--fsdp={fsdp} --tensor={tensor} on {jax.device_count()} devices: {e}") from None
    base_cfg = dataclasses.replace(model_cfg, lora_rank=0, lora_targets=())
    checked_checkpoint(hf_dir, base_cfg, family)  # a checkpoint refused here leaves the WORKDIR untouched

    created = _prepare_workdir(workdir)
    try:
        _write_workdir(hf_dir, workdir, cfg, base_cfg, model_cfg, family, shardings, adapter, head, is_main)
    except BaseException:
        if created and is_main:  # nothing there was the user's: an unfinished import leaves nothing behind
            workdir.rmtree(missing_ok=True)
        raise
    return workdir


def _write_workdir(hf_dir: epath.Path, workdir: epath.Path, cfg, base_cfg: ModelConfig, model_cfg: ModelConfig,
                   family: Family, shardings, adapter, head: str, is_main: bool) -> None:
    """Tokenizer, init_params, the source configs, then config.json last (what marks a finished import)."""
    if is_main and _copy_tokenizer(hf_dir, workdir / "tokenizer"):
        cfg.data.tokenizer_dir = str(workdir / "tokenizer")
    params = load_hf_params(hf_dir, base_cfg, family, shardings)
    if adapter is not None:
        params = adapter.add_to(params, model_cfg, shardings)
    if is_main and (workdir / "init_params").exists():  # --force, or left by an import killed before config.json
        (workdir / "init_params").rmtree()
    save_init_params(str(workdir), params)
    if is_main:
        (hf_dir / "config.json").copy(workdir / SOURCE_CONFIG, overwrite=True)
        if (hf_dir / "generation_config.json").is_file():
            (hf_dir / "generation_config.json").copy(workdir / SOURCE_GENERATION_CONFIG, overwrite=True)
        if head in ("classify", "token_classify"):
            (workdir / LABELS).write_text(json.dumps(read_hf_labels(hf_dir)))
        if adapter is not None:
            write_source_config(adapter, workdir)
        (workdir / "config.json").write_text(to_json(cfg))


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a family's authors fine-tuned it: optimizer settings written into the imported config, and the
    warmup as a share of train.steps."""

    settings: dict
    warmup_fraction: float
    text: str


_BERT_RECIPE = Recipe({"lr": 3e-5, "b2": 0.999, "weight_decay": 0.01, "schedule": "linear"}, 0.06,
                      "lr 2e-5 to 5e-5 (3e-5 set), Adam b2 0.999, weight decay 0.01, linear decay after a linear warmup "
                      "of about 6% of the steps, batch 16 or 32, 2 to 4 epochs")
_ROBERTA_RECIPE = Recipe({"lr": 2e-5, "b2": 0.98, "weight_decay": 0.1, "schedule": "linear"}, 0.06,
                         "lr 1e-5 to 3e-5 (2e-5 set), Adam b2 0.98, weight decay 0.1, linear decay after a linear "
                         "warmup of about 6% of the steps, batch 16 or 32, up to 10 epochs")
FINE_TUNING_RECIPES = {"bert": _BERT_RECIPE, "roberta": _ROBERTA_RECIPE}


def _tokenizer_step(workdir: epath.Path, tokenizer: epath.Path) -> list[str]:
    if (tokenizer / "tokenizer.json").is_file():
        return []
    return [f"  0. the model came without a tokenizer.json: put its tokenizer files into {tokenizer} and set "
            f"data.tokenizer_dir to it in {workdir / 'config.json'} (or pass --config.data.tokenizer_dir=...)"]


def _recipe_lines(workdir: epath.Path, cfg: dict) -> list[str]:
    """The fine-tuning recipe of the imported family (from its hf_config.json), when lmtrain knows one."""
    source = workdir / SOURCE_CONFIG
    model_type = json.loads(source.read_text()).get("model_type") if source.is_file() else None
    recipe = FINE_TUNING_RECIPES.get(model_type)
    if recipe is None:
        return []
    m = cfg["model"]
    return [f"Fine-tuning recipe ({model_type}): {recipe.text}. The config has it (optimizer.*); keep "
            f"optimizer.warmup_steps near {recipe.warmup_fraction:.0%} of train.steps when you change the steps. "
            f"The model's own dropout is in it too: model.dropout={m['dropout']}, model.attention_dropout="
            f"{m.get('attention_dropout', 0.0)}, model.classifier_dropout={m.get('classifier_dropout', 0.0)}."]


def next_steps(workdir: epath.Path) -> str:
    """The whole path from an imported WORKDIR to fine-tuning: shard with the model's tokenizer, then train.
    An encoder is fine-tuned as a classifier (labelled text); a decoder continues on plain text."""
    tokenizer, shards = workdir / "tokenizer", workdir / "shards"
    cfg = json.loads((workdir / "config.json").read_text())  # as written by import_hf (maybe on gs://)
    task, recipe = cfg["task"]["name"], _recipe_lines(workdir, cfg)
    labels = read_labels(workdir / LABELS)
    if labels:
        return "\n".join([
            f"This is a {'token' if task == 'token_classify' else 'sequence'} classifier over {len(labels)} "
            f"classes ({', '.join(labels[:6])}{', ...' if len(labels) > 6 else ''}; in class order in "
            f"{workdir / LABELS}). Fine-tune it with the {task} task on data with the same labels "
            f"(README: 'Fine-tune for a task'), or export it with lmtrain export {workdir} OUT.", *recipe])
    config = workdir / "config.json"
    if cfg["model"].get("arch") == "t5":
        return "\n".join([
            "Fine-tune this encoder-decoder on input -> target pairs in two steps:", *_tokenizer_step(workdir, tokenizer),
            "  1. tokenize .jsonl records with 'prompt' (the encoder's input) and 'completion' (the target) fields "
            "with the model's own tokenizer:",
            f"     python tools/shard_data.py --input 'data/*.jsonl' --format sft --tokenizer {tokenizer} "
            f"--output {shards}",
            "  2. train the seq2seq task from the imported weights on those shards:",
            f"     lmtrain train --config {config} --workdir {workdir} --config.data.shards_dir={shards}"])
    if not cfg["model"]["causal"]:
        return "\n".join([
            "Fine-tune this encoder as a text classifier in two steps:", *_tokenizer_step(workdir, tokenizer),
            "  1. tokenize labelled examples (.jsonl with 'text' and 'label' fields; see tools/shard_data.py --help) "
            "with the model's own tokenizer:",
            f"     python tools/shard_data.py --input 'data/*.jsonl' --format classify --tokenizer {tokenizer} "
            f"--output {shards} --seq-len {cfg['data']['seq_len']}",
            "  2. train a classifier (a fresh head on the imported encoder) on those shards:",
            f"     lmtrain train --config {config} --workdir {workdir} --config.task.name=classify "
            f"--config.data.shards_dir={shards}",
            *recipe,
            "(To continue masked-LM pretraining on plain text instead, shard without --format and train with the "
            f"config as it is, task.name={task}.)"])
    return "\n".join([
        "Fine-tune on your own text in two steps:", *_tokenizer_step(workdir, tokenizer),
        "  1. tokenize your text into shards with the model's own tokenizer (.jsonl with a 'text' field, .txt, "
        "Parquet or a Hugging Face dataset; see tools/shard_data.py --help):",
        f"     python tools/shard_data.py --input 'data/*.jsonl' --tokenizer {tokenizer} --output {shards}",
        "  2. train from the imported weights on those shards:",
        f"     lmtrain train --config {config} --workdir {workdir} --config.data.shards_dir={shards}"])


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lmtrain import",
        description="Import a Hugging Face model directory (config.json + safetensors) into an lmtrain WORKDIR.",
    )
    parser.add_argument("hf_dir", help="Hugging Face model directory: config.json, model.safetensors[.index.json]")
    parser.add_argument("workdir", help="WORKDIR to create: config.json, init_params/, tokenizer/")
    parser.add_argument("--fsdp", type=_positive, default=1,
                        help="FSDP mesh size to shard the weights over (and train with)")
    parser.add_argument("--tensor", type=_positive, default=1, help="tensor-parallel mesh size (and to train with)")
    parser.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"),
                        help="storage dtype of the imported parameters")
    parser.add_argument("--force", action="store_true", help="overwrite an existing WORKDIR/config.json")
    parser.add_argument("--adapter", default=None, metavar="PEFT_DIR",
                        help="a PEFT LoRA adapter of HF_DIR's model to continue training (adapter_config.json and "
                             "adapter_model.safetensors)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    try:
        workdir = import_hf(args.hf_dir, args.workdir, args.fsdp, args.tensor, args.param_dtype, args.force,
                            adapter_dir=args.adapter)
    except HFInteropError as e:
        print(f"lmtrain import: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a permission, a full disk: the user's to fix, not a bug
        print(f"lmtrain import: error: {e.filename or args.workdir}: {e.strerror or e}. Fix that and import "
              "again (with --force if WORKDIR/config.json was written).", file=sys.stderr)
        return 2
    print(f"lmtrain import: {args.hf_dir} -> {workdir} in {time.perf_counter() - start:.1f}s.")
    print(next_steps(workdir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
