"""`lmtrain export WORKDIR OUT --adapter`: a LoRA run's adapters as a PEFT adapter directory.

OUT gets adapter_config.json (peft_type LORA, r, lora_alpha, lora_dropout, target_modules in the family's module
names) and adapter_model.safetensors with PEFT's tensor names:
`base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r], the layout of a torch Linear
whatever the base layer is (GPT-2's Conv1D included: `fan_in_fan_out` tells PEFT to transpose only when merging).
`peft.PeftModel.from_pretrained(base, OUT)` then computes what the lmtrain model computes.

Which HF module holds which lmtrain weight comes from the family's TensorRule table, the one place that knows HF
names. A fused HF projection (GPT-2's c_attn holds q, k and v) gets one PEFT adapter whose A stacks the adapted
parts' A's and whose B is block-diagonal: rank m*r for m adapted parts, alpha m*alpha, so the scale alpha/r and
the product are unchanged. The parts are recorded in the safetensors metadata, so `lmtrain import --adapter`
splits them back exactly.

Tensors a run trained besides its adapters (a task head) go into PEFT's `modules_to_save`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys

import jax
import numpy as np
from etils import epath

from lmtrain.interop.export_common import DTYPES, PUBLISHER, agree_on_target, check_dtype, layer_of, new_staging_dir, to_host
from lmtrain.interop.families import FAMILIES, Family, HFInteropError, TensorRule, family_for_model
from lmtrain.model import adapters
from lmtrain.model.layers import ModelConfig
from lmtrain.param_rules import TARGETS
from lmtrain.paths import as_path
from lmtrain.storage.safetensors import write_tensors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# The adapter's adapter_config.json, kept in the WORKDIR: `lmtrain export --adapter` names the same base model.
SOURCE_ADAPTER_CONFIG = "hf_adapter_config.json"
PEFT_PREFIX = "base_model.model."
# safetensors metadata: {module template: [targets stacked in its A, in order]} for fused projections.
FUSED_METADATA = "lmtrain_fused_parts"
# lmtrain weight path -> canonical LoRA target.
PROJECTIONS = {f"blocks/{'attn' if t in ('q', 'k', 'v', 'o') else 'mlp'}/{w}": t for t, w in TARGETS.items()}
# Families whose projections are transformers' Conv1D ([in, out] weights): PEFT needs fan_in_fan_out=True.
CONV1D_FAMILIES = ("gpt2",)
# PEFT's task_type for each lmtrain head (None: a bare PeftModel).
TASK_TYPES = {"lm": "CAUSAL_LM", "classify": "SEQ_CLS", "token_classify": "TOKEN_CLS"}


@dataclasses.dataclass(frozen=True)
class Projection:
    """One HF projection module and the lmtrain weights it holds, in the order of its output features."""

    module: str  # HF module name, '{i}' for the layer: 'model.layers.{i}.self_attn.q_proj'
    rule: TensorRule
    targets: tuple[str, ...]  # canonical LoRA targets of rule.lm, same order (GPT-2's c_attn: q, k, v)

    def name(self, layer: int) -> str:
        return self.module.format(i=layer)


def _module_of(hf_tensor: str) -> str:
    return hf_tensor.rsplit(".", 1)[0]


def projections(cfg: ModelConfig, family: Family) -> list[Projection]:
    """The family's projection modules that LoRA can adapt; a family without LoRA names is an error."""
    if not family.lora_modules:
        known = sorted(name for name, fam in FAMILIES.items() if fam.lora_modules)
        raise HFInteropError(
            f"LoRA adapters of the {family.name} family are not supported: lmtrain does not know its module names "
            f"(it knows {', '.join(known)}). Export the merged model instead (without --adapter).")
    out = []
    for rule in family.rules(cfg):
        if rule.per_layer and rule.hf.endswith(".weight") and all(p in PROJECTIONS for p in rule.lm):
            out.append(Projection(_module_of(rule.hf), rule, tuple(PROJECTIONS[p] for p in rule.lm)))
    return out


def module_names(cfg: ModelConfig, family: Family) -> set[str]:
    """Every module name of the HF model (templates with '{i}' for block modules), parents included."""
    names = set()
    for rule in family.rules(cfg):
        parts = _module_of(rule.hf).split(".")
        names.update(".".join(parts[:k]) for k in range(1, len(parts) + 1))
    return names


def target_modules(adapted: list[str], all_modules: set[str]) -> list[str] | str:
    """PEFT's target_modules for the adapted module templates: the shortest dotted suffixes that pick exactly those
    modules (PEFT matches a list entry as a suffix), or, where no suffix is unambiguous (BERT's `output.dense` is
    also the end of `attention.output.dense`), one regular expression that PEFT matches in full."""
    names = []
    for template in adapted:
        parts = template.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if "{i}" in suffix:
                return "|".join(_template_regex(t) for t in adapted)
            if {m for m in all_modules if m == suffix or m.endswith("." + suffix)} == {template}:
                names.append(suffix)
                break
    return names


def _template_regex(template: str) -> str:
    return r"\d+".join(re.escape(piece) for piece in template.split("{i}"))


# ---------------------------------------------------------------------------------------------- tensors


def _lookup(params: dict, path: str):
    node = params
    for key in path.split("/"):
        node = node[key]
    return node


def _adapter_of(params: dict, path: str, prefix: str) -> dict | None:
    parent, name = path.rsplit("/", 1)
    return _lookup(params, parent).get(prefix + name)


def peft_factors(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """lmtrain's factors of one layer, A [in dims..., r] and B [r, out dims...], as PEFT's Linear weights
    lora_A [r, in] and lora_B [out, r]. The dims flatten in the order the family's rules flatten the weight
    (heads-major, as in the HF weight), which is what makes B A the HF delta."""
    rank = a.shape[-1]
    return np.ascontiguousarray(a.reshape(-1, rank).T), np.ascontiguousarray(b.reshape(rank, -1).T)


def fused_factors(parts: list[tuple[np.ndarray | None, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """One PEFT adapter for a fused projection from its parts in output order, each (A [r, in], B [out, r]) or, for a
    part without an adapter, (None, zeros [out, r]): A stacks the adapted parts' A's and B is block-diagonal, each
    part's B on its own output rows and its own rank columns."""
    adapted = [(a, b) for a, b in parts if a is not None]
    rank = adapted[0][0].shape[0]
    a_stacked = np.concatenate([a for a, _ in adapted], axis=0)
    b_fused = np.zeros((sum(b.shape[0] for _, b in parts), rank * len(adapted)), np.float32)
    row = col = 0
    for a, b in parts:
        if a is not None:
            b_fused[row:row + b.shape[0], col:col + rank] = b
            col += rank
        row += b.shape[0]
    return a_stacked, b_fused


def _to_host_layer(value, layer: int) -> np.ndarray:
    return np.asarray(to_host(layer_of(value, layer)), np.float32)


def adapter_contents(cfg: ModelConfig, params: dict, family: Family, trained: set[str] | None = None,
                     np_dtype=np.float32) -> tuple[dict[str, np.ndarray], dict, dict[str, str]]:
    """(tensors by PEFT name, the adapter_config fields lmtrain determines, safetensors metadata).

    `trained`: the parameter paths the run trained; those that are not adapters (a task head) are saved whole, as
    PEFT's modules_to_save. None: the LoRA default (adapters, and the head of a task other than 'lm').
    """
    if not cfg.lora_rank:
        raise HFInteropError("this model has no LoRA adapters (model.lora_rank=0), so there is no adapter to export; "
                             "export the whole model without --adapter.")
    method = cfg.adapter_method
    if method.peft is None or method.peft.peft_type != "LORA":  # this writer knows PEFT's LoRA layout only
        raise HFInteropError(f"model.adapter='{method.name}' has no PEFT LoRA adapter format; export the merged model "
                             "instead (without --adapter).")
    a_name, b_name = method.peft.tensor_names
    r = cfg.lora_rank
    tensors: dict[str, np.ndarray] = {}
    adapted, rank_pattern, alpha_pattern, fused = [], {}, {}, {}
    for proj in projections(cfg, family):
        present = [t in cfg.lora_targets for t in proj.targets]
        if not any(present):
            continue
        adapted.append(proj)
        n = sum(present)
        if len(proj.targets) > 1:
            fused[proj.module] = [t for t, p in zip(proj.targets, present, strict=True) if p]
        for layer in range(cfg.n_layers):
            parts = []
            for path, is_adapted in zip(proj.rule.lm, present, strict=True):
                if is_adapted:
                    lora = _adapter_of(params, path, method.prefix)
                    parts.append(peft_factors(_to_host_layer(lora["a"], layer), _to_host_layer(lora["b"], layer)))
                else:
                    n_out = math.prod(_lookup(params, path).shape[1:]) // _in_size(path, params)
                    parts.append((None, np.zeros((n_out, r), np.float32)))
            if len(parts) == 1:
                a, b = parts[0]
            else:
                a, b = fused_factors(parts)
            name = PEFT_PREFIX + proj.name(layer)
            tensors[f"{name}.{a_name}"] = a.astype(np_dtype)
            tensors[f"{name}.{b_name}"] = b.astype(np_dtype)
        if n > 1:
            rank_pattern[proj.module] = n * r
            alpha_pattern[proj.module] = n * cfg.lora_alpha

    all_modules = module_names(cfg, family)
    targets = target_modules([p.module for p in adapted], all_modules)
    if isinstance(targets, list):  # patterns keyed like target_modules (PEFT matches them as suffixes)
        short = dict(zip([p.module for p in adapted], targets, strict=True))
    else:
        short = {p.module: _template_regex(p.module) for p in adapted}
    rank_pattern = {short[m]: v for m, v in rank_pattern.items()}
    alpha_pattern = {short[m]: v for m, v in alpha_pattern.items()}

    saved_modules = _modules_to_save(cfg, family, trained)
    for rule in family.rules(cfg):
        for layer in range(cfg.n_layers) if rule.per_layer else [None]:
            if _module_of(rule.hf_name(layer)) in saved_modules:
                host = tuple(np.asarray(_to_host_layer(_lookup(params, p), layer) if layer is not None else
                                        _full_to_host(_lookup(params, p))) for p in rule.lm)
                tensors[PEFT_PREFIX + rule.hf_name(layer)] = rule.to_hf(host).astype(np_dtype)

    config = {
        "peft_type": method.peft.peft_type,
        "task_type": TASK_TYPES.get(cfg.head),
        "r": r,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": targets,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "fan_in_fan_out": family.name in CONV1D_FAMILIES,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": sorted(saved_modules) or None,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    metadata = {"format": "pt"}
    if fused:
        metadata[FUSED_METADATA] = json.dumps(fused, sort_keys=True)
    return tensors, config, metadata


def _in_size(path: str, params: dict) -> int:
    """Input features of the projection (the contracted dims of its lmtrain weight, after the layers axis)."""
    target = PROJECTIONS[path]
    shape = _lookup(params, path).shape[1:]
    return int(np.prod(shape[:2])) if target == "o" else int(shape[0])


def _full_to_host(value) -> np.ndarray:
    return np.asarray(to_host(value), np.float32)


def _modules_to_save(cfg: ModelConfig, family: Family, trained: set[str] | None) -> set[str]:
    """HF module names (one per layer for block modules) holding a trained parameter that is not an adapter."""
    if trained is None:
        trained = {p for rule in family.rules(cfg) for p in rule.lm if p.startswith("head/")} if cfg.head != "lm" else set()
    trained = {p for p in trained if cfg.adapter_method.prefix not in p}
    modules = set()
    for rule in family.rules(cfg):
        if trained.intersection(rule.lm):
            layers = range(cfg.n_layers) if rule.per_layer else [None]
            modules.update(_module_of(rule.hf_name(layer)) for layer in layers)
    parents = {m for m in modules if any(_module_of(r.hf).startswith(m + ".") for r in family.rules(cfg))}
    if parents:  # PEFT saves such a module whole, children and tied weights included, which lmtrain does not hold
        raise HFInteropError(
            f"the run trained {', '.join(sorted(trained))}; in a PEFT adapter these belong to {sorted(parents)[0]}, "
            "a module with sub-modules that PEFT's modules_to_save would save whole. Export the merged model (without "
            "--adapter) instead, or train that head frozen (optimizer.param_rules).")
    return modules


# ---------------------------------------------------------------------------------------------- export


def export_adapter(cfg: ModelConfig, params: dict, out_dir: str | os.PathLike, *, trained: set[str] | None = None,
                   base_model: str | None = None, source_config: dict | None = None, dtype: str = "float32",
                   force: bool = False) -> epath.Path:
    """Write the adapters of `params` (a LoRA model's parameters) as a PEFT adapter directory. Every process
    must call this; process 0 writes. Like `export_params`, OUT appears only once whole."""
    out_dir = as_path(out_dir)
    source_config = source_config or {}
    preferred = source_config.get("model_type")
    family = family_for_model(cfg, preferred if isinstance(preferred, str) else None)
    check_dtype(dtype)
    tensors, config, metadata = adapter_contents(cfg, params, family, trained, DTYPES[dtype][0])
    config["base_model_name_or_path"] = base_model
    agree_on_target(out_dir, force)
    if jax.process_index() != 0:
        return out_dir
    with PUBLISHER.staged(out_dir, new_staging_dir(out_dir)) as staging:
        write_tensors(staging / ADAPTER_WEIGHTS, tensors, metadata)
        (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))  # last: marks it whole
    return out_dir


def without_adapters(cfg: ModelConfig, params: dict) -> tuple[ModelConfig, dict]:
    """The base model the adapters apply to: the parameters without them, and the config without adapters."""
    return dataclasses.replace(cfg, lora_rank=0, lora_targets=()), adapters.without_adapters(params, cfg)


def merge_adapters(cfg: ModelConfig, params: dict) -> tuple[ModelConfig, dict]:
    """The ordinary model an adapter model computes: each adapter folded into its weight (LoRA: W + (alpha / r) A B)."""
    if not cfg.lora_rank:
        return cfg, params
    return dataclasses.replace(cfg, lora_rank=0, lora_targets=()), adapters.merged_params(params, cfg)


def default_base_model(workdir: epath.Path, source_config: dict | None) -> str | None:
    """base_model_name_or_path when --base-model is not given: what the imported adapter or model named."""
    path = workdir / SOURCE_ADAPTER_CONFIG
    if path.is_file():
        name = json.loads(path.read_text()).get("base_model_name_or_path")
        if name:
            return name
    name = (source_config or {}).get("_name_or_path")
    if name:
        return name
    print("lmtrain export: note: adapter_config.json names no base model (base_model_name_or_path is null): pass "
          "--base-model NAME_OR_DIR; `lmtrain export WORKDIR BASE_DIR --base` writes the base these adapters apply to.",
          file=sys.stderr)
    return None
