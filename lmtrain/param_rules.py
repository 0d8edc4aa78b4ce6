"""Parameter rules: which parameters train, which get weight decay, and each one's learning-rate multiplier.

Everything that decides it lives here:
- the rule grammar, `(regex over the parameter path, label)` with the labels in `PARAM_RULE_LABELS`, and its
  parsing (`check_param_rules`);
- the `optimizer.freeze` presets (`freeze_presets`);
- the adapters' target vocabulary (`TARGETS`, `FAMILY_NAMES`, `resolve_targets`) and their settings' checks
  (`check_lora`); what an adapter run freezes and trains is its method's to say (`model_cfg.adapter_method`);
- `named_param_rules`: the rules a run applies, in order, each named by the config key it comes from;
- `ParamPlan`: the rules applied to one model's parameter shapes.

Error messages name the user's key (`optimizer.param_rules[2]`, `optimizer.freeze='blocks:9'`,
`model.lora_targets`). The adapter methods are `lmtrain.model.adapters`; the optimizer that reads a plan is
`lmtrain.train.optimizer`. This module imports neither, so `config` can validate with it without loading jax.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping

import numpy as np

from lmtrain.errors import ConfigError
from lmtrain.trees import flat_paths, nest_paths

# ---------------------------------------------------------------------------------------------- the rule grammar

PARAM_RULE_LABELS = ("train", "freeze", "freeze_layers=A-B", "decay", "no_decay", "lr=X")

# Default parameter rules: no weight decay on norms, biases, embeddings and the LM head. A tied
# embedding and an untied head are treated alike: both are the vocabulary projection.
DEFAULT_PARAM_RULES = (
    (r"(^|/)(scale|bias|b[a-z_]*)$", "no_decay"),
    (r"^(embed|pos_embed|head/w)$", "no_decay"),
)


def check_param_rules(rules) -> list[tuple]:
    """The rules as (compiled regex, property, value); a malformed rule names itself."""
    out = []
    for i, rule in enumerate(rules):
        if not isinstance(rule, list | tuple) or len(rule) != 2:
            raise ConfigError(f"optimizer.param_rules[{i}]={rule!r}: each rule is a pair (regex, label).")
        pattern, label = rule
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"optimizer.param_rules[{i}]: regex {pattern!r} does not compile ({e}).") from None
        if label in ("train", "freeze"):
            out.append((regex, "trainable", label == "train"))
        elif label in ("decay", "no_decay"):
            out.append((regex, "decay", label == "decay"))
        elif isinstance(label, str) and label.startswith("lr="):
            try:
                mult = float(label[3:])
            except ValueError:
                mult = -1.0
            if not 0 <= mult < math.inf:  # NaN fails too
                raise ConfigError(f"optimizer.param_rules[{i}]: label {label!r} needs a finite non-negative number, "
                                  "e.g. 'lr=0.1'.")
            out.append((regex, "lr_mult", mult))
        elif isinstance(label, str) and label.startswith("freeze_layers="):
            lo, sep, hi = label[len("freeze_layers="):].partition("-")
            if not (lo.isdigit() and sep and hi.isdigit() and int(lo) <= int(hi)):
                raise ConfigError(f"optimizer.param_rules[{i}]: label {label!r} needs a block range, e.g. "
                                  "'freeze_layers=0-3' (blocks 0 to 3, inclusive).")
            out.append((regex, "frozen_layers", (int(lo), int(hi))))
        else:
            raise ConfigError(f"optimizer.param_rules[{i}]: label {label!r} is unknown. "
                              f"Labels: {', '.join(PARAM_RULE_LABELS)}.")
    return out


# ---------------------------------------------------------------------------------------------- presets


def freeze_presets(spec: str, n_layers: int) -> tuple:
    """The rules that `optimizer.freeze` presets stand for."""
    rules: tuple = ()
    for item in _preset_items(spec):
        if item == "embeddings":
            rules += ((r"^(embed|pos_embed|type_embed)$", "freeze"),)
        elif item == "all_but_head":
            rules += ((r".", "freeze"), (r"^head/", "train"))
        elif item.startswith("blocks:") and item[len("blocks:"):].isdigit():
            n = int(item[len("blocks:"):])
            if not 1 <= n <= n_layers:
                raise ConfigError(f"optimizer.freeze='{item}': the model has {n_layers} blocks; freeze 1 to {n_layers}.")
            rules += ((r"^blocks/", f"freeze_layers=0-{n - 1}"),)
        else:
            raise ConfigError(f"optimizer.freeze='{item}' is unknown. Presets: embeddings, blocks:N, all_but_head "
                              "(join several with '+'), or write optimizer.param_rules.")
    return rules


def _preset_items(spec: str) -> list[str]:
    """'embeddings + blocks:4' -> ['embeddings', 'blocks:4']."""
    return [item for item in (part.strip() for part in spec.split("+")) if item]


# ---------------------------------------------------------------------------------------------- adapter targets

# Canonical target -> the model's projection attribute.
TARGETS = {"q": "wq", "k": "wk", "v": "wv", "o": "wo", "gate": "w_gate", "up": "w_in", "down": "w_out"}

# Each family's names for the same projections (Hugging Face module names, as PEFT's target_modules).
FAMILY_NAMES = {
    "llama": {"q_proj": ("q",), "k_proj": ("k",), "v_proj": ("v",), "o_proj": ("o",), "gate_proj": ("gate",),
              "up_proj": ("up",), "down_proj": ("down",)},
    "gpt2": {"c_attn": ("q", "k", "v"), "attn.c_proj": ("o",), "c_fc": ("up",), "mlp.c_proj": ("down",)},
    "bert": {"query": ("q",), "key": ("k",), "value": ("v",), "attention.output.dense": ("o",),
             "intermediate.dense": ("up",), "output.dense": ("down",)},
    # T5: q, k, v and o name both the self- and the cross-attention projections, in PEFT as in lmtrain
    "t5": {"q": ("q",), "k": ("k",), "v": ("v",), "o": ("o",), "wi": ("up",), "wi_0": ("gate",), "wi_1": ("up",),
           "wo": ("down",)},
}
FAMILY_NAMES["mistral"] = FAMILY_NAMES["qwen2"] = FAMILY_NAMES["llama"]
FAMILY_NAMES["roberta"] = FAMILY_NAMES["bert"]


class LoRAError(ValueError):
    """A LoRA setting that cannot apply to this model; the message names it and what to choose."""


GATED_MLPS = ("swiglu", "gated-gelu")  # the feed-forwards with a gate projection (decoders; T5 v1.1)


def resolve_targets(names, mlp: str) -> tuple[str, ...]:
    """Canonical targets from canonical or family names; a name that matches no projection is an error."""
    known = dict.fromkeys(TARGETS)
    aliases = {alias: parts for table in FAMILY_NAMES.values() for alias, parts in table.items()}
    out: list[str] = []
    for name in names:
        if name in known:
            parts = (name,)
        elif name in aliases:
            parts = aliases[name]
        else:
            raise LoRAError(
                f"model.lora_targets: '{name}' matches no projection. Use q, k, v, o, gate, up, down, or a family's "
                f"module names ({', '.join(sorted(aliases))}).")
        for part in parts:
            if part == "gate" and mlp not in GATED_MLPS:
                raise LoRAError(f"model.lora_targets: '{name}' matches no projection of this model: its MLP "
                                f"(model.mlp='{mlp}') has no gate projection. Use up and down for the MLP.")
            if part not in out:
                out.append(part)
    if not out:
        raise LoRAError("model.lora_rank > 0 needs model.lora_targets, e.g. ('q', 'v') or ('q', 'k', 'v', 'o').")
    return tuple(out)


def projection_dims(target: str, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int,
                    d_ff: int) -> tuple[int, int]:
    """(input size, output size) of the projection a canonical target adapts."""
    return {"q": (d_model, n_heads * head_dim), "k": (d_model, n_kv_heads * head_dim),
            "v": (d_model, n_kv_heads * head_dim), "o": (n_heads * head_dim, d_model),
            "gate": (d_model, d_ff), "up": (d_model, d_ff), "down": (d_ff, d_model)}[target]


def check_rank(rank: int, targets: tuple[str, ...], **dims: int) -> None:
    """A rank above a projection's smaller side adds parameters that A B cannot use (its rank is at most that)."""
    for target in targets:
        n_in, n_out = projection_dims(target, **dims)
        if rank > min(n_in, n_out):
            raise LoRAError(f"model.lora_rank={rank} is above the smaller dimension of the '{target}' projection "
                            f"({n_in} -> {n_out}); use a rank of at most {min(n_in, n_out)}.")


def check_lora(m) -> None:
    """The `model.lora_*` settings of config section `m`, as a ConfigError that names the key."""
    if not m.lora_rank:
        return
    if m.lora_rank < 0 or not m.lora_alpha > 0 or not 0.0 <= m.lora_dropout < 1.0:
        raise ConfigError(f"model.lora_rank={m.lora_rank}, lora_alpha={m.lora_alpha}, lora_dropout={m.lora_dropout}: "
                          "the rank must be positive, alpha positive, and dropout in [0, 1).")
    try:
        targets = resolve_targets(tuple(m.lora_targets), m.mlp)
        check_rank(m.lora_rank, targets, d_model=m.d_model, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads,
                   head_dim=m.head_dim or m.d_model // m.n_heads, d_ff=m.d_ff)
    except LoRAError as e:
        raise ConfigError(str(e)) from None


# ---------------------------------------------------------------------------------------------- a run's rules


def named_param_rules(cfg, model_cfg, task) -> list[tuple[str, tuple]]:
    """The parameter rules a run applies, each with where it comes from (for error messages): the adapter method's
    when adapters are on (LoRA: base frozen, adapters and a task head trained), then the optimizer.freeze presets,
    then optimizer.param_rules (later rules override earlier ones)."""
    named = []
    if model_cfg.lora_rank:  # the adapter method says what it freezes and trains (AdapterMethod.param_rules)
        named += model_cfg.adapter_method.param_rules(task.head)
    for item in _preset_items(cfg.optimizer.freeze):
        named += [(f"optimizer.freeze='{item}'", rule) for rule in freeze_presets(item, cfg.model.n_layers)]
    named += [(f"optimizer.param_rules[{k}]", tuple(r)) for k, r in enumerate(cfg.optimizer.param_rules)]
    return named


# ---------------------------------------------------------------------------------------------- the plan


def param_paths(tree: Mapping) -> dict[str, object]:
    """{'blocks/attn/wq': leaf, ...} for a nested dict of parameters (or of their shapes)."""
    return flat_paths(tree)


def shapes_at(shapes: Mapping, path: str) -> tuple[int, ...]:
    node = shapes
    for key in path.split("/"):
        node = node[key]
    return tuple(node.shape)


@dataclasses.dataclass(frozen=True)
class ParamPlan:
    """The rules table applied to a model: per parameter path, whether it trains, decays, and its lr multiplier.

    Frozen parameters never reach the optimizer: the step splits them off before differentiating, so they
    have no optimizer state and no update, weight decay included."""

    trainable: dict[str, bool]
    decay: dict[str, bool]
    lr_mult: dict[str, float]
    frozen_layers: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)  # blocks lo..hi, inclusive

    @classmethod
    def from_rules(cls, shapes: Mapping, rules, weight_decay_default: bool = True, where: str = "optimizer.param_rules",
                   names: list[str] | None = None) -> ParamPlan:
        """`names[i]` says where rule i came from in error messages (default: `where[i]`)."""
        paths = list(param_paths(shapes))
        trainable = dict.fromkeys(paths, True)
        decay = dict.fromkeys(paths, weight_decay_default)
        lr_mult = dict.fromkeys(paths, 1.0)
        frozen_layers: dict[str, tuple[int, int]] = {}
        tables = {"trainable": trainable, "decay": decay, "lr_mult": lr_mult, "frozen_layers": frozen_layers}
        for i, (regex, prop, value) in enumerate(check_param_rules(rules)):
            name = names[i] if names else f"{where}[{i}]"
            hits = [p for p in paths if regex.search(p)]
            if not hits:
                raise ConfigError(
                    f"{name}: regex {regex.pattern!r} matches no parameter. "
                    f"Parameters look like: {', '.join(paths[:6])}, ...")
            if prop == "frozen_layers":
                stacked = [p for p in hits if p.startswith("blocks/")]
                if len(stacked) != len(hits):
                    raise ConfigError(f"{name}: a layer range applies to block parameters (blocks/...), not to "
                                      f"{', '.join(p for p in hits if p not in stacked)}.")
                n_layers = shapes_at(shapes, stacked[0])[0]
                if value[1] >= n_layers:
                    raise ConfigError(f"{name}: blocks {value[0]}-{value[1]} do not exist; the model has "
                                      f"{n_layers} blocks (0-{n_layers - 1}).")
            for p in hits:
                tables[prop][p] = value
        if not any(trainable.values()):
            raise ConfigError(f"{where} freeze every parameter; nothing would train.")
        return cls(trainable, decay, lr_mult, {p: r for p, r in frozen_layers.items() if trainable[p]})

    @classmethod
    def for_run(cls, cfg, model_def, task) -> ParamPlan:
        """The plan of a training run: `named_param_rules` applied to the model's shapes."""
        named = named_param_rules(cfg, model_def.cfg, task)
        return cls.from_rules(model_def.shapes, [rule for _, rule in named], names=[name for name, _ in named])

    def layer_masks(self, shapes: Mapping) -> dict:
        """{path: bool [n_layers]} (True: the block trains) for block parameters frozen in part."""
        masks = {}
        for path, (lo, hi) in self.frozen_layers.items():
            mask = np.ones(shapes_at(shapes, path)[0], bool)
            mask[lo : hi + 1] = False
            masks[path] = mask
        return nest_paths(masks)

    def split(self, params: Mapping) -> tuple[dict, dict]:
        """(trainable, frozen) sub-dicts of `params`; each holds only its own leaves."""
        flat = param_paths(params)
        return (nest_paths({p: v for p, v in flat.items() if self.trainable[p]}),
                nest_paths({p: v for p, v in flat.items() if not self.trainable[p]}))

    @staticmethod
    def merge(trainable: Mapping, frozen: Mapping) -> dict:
        return nest_paths({**param_paths(frozen), **param_paths(trainable)})

    def counts(self, shapes: Mapping) -> tuple[int, int]:
        """(trainable, frozen) parameter counts."""
        sizes = {p: math.prod(s.shape) for p, s in param_paths(shapes).items()}
        train = sum(n for p, n in sizes.items() if self.trainable[p])
        return train, sum(sizes.values()) - train

    def decay_mask(self, params: Mapping) -> dict:
        """A tree like `params` of bools: True where weight decay applies (optax's `mask`)."""
        return self._tree(self.decay, params)

    def lr_scales(self, params: Mapping) -> dict:
        """A tree like `params` of each parameter's learning-rate multiplier."""
        return self._tree(self.lr_mult, params)

    def _tree(self, table: Mapping, params: Mapping):
        return nest_paths({p: table[p] for p in param_paths(params)})
