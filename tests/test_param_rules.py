"""Parameter rules in one module (issue 18): `lmtrain.param_rules` holds the grammar, the presets, LoRA's rules and
the plan, and `config` validates with it without loading the model code (config no longer imports model/lora)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lmtrain.config import ConfigError, validate
from lmtrain.param_rules import DEFAULT_PARAM_RULES, ParamPlan, check_lora, check_param_rules, freeze_presets, named_param_rules
from lmtrain.train.trainer import Components
from tests.core_fixtures import REPO
from tests.helpers import small_config

VALIDATE_LORA = """
import sys
from lmtrain.config import base_config, validate
c = base_config()
c.model.lora_rank, c.model.lora_targets = 4, ("q_proj", "v")
validate(c, 1)
c.model.lora_targets = ("qq",)
try:
    validate(c, 1)
except Exception as e:
    print(type(e).__name__, e)
print(sorted(m for m in sys.modules if m.startswith("lmtrain.") or m in ("jax", "flax")))
"""


def test_config_validates_lora_and_rules_without_loading_the_model_code():
    done = subprocess.run([sys.executable, "-c", VALIDATE_LORA], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    error, loaded = done.stdout.strip().splitlines()
    assert error.startswith("ConfigError model.lora_targets: 'qq' matches no projection"), error
    assert loaded == ("['lmtrain.config', 'lmtrain.errors', 'lmtrain.param_rules', 'lmtrain.tasks', "
                      "'lmtrain.tasks.options', 'lmtrain.trees']"), loaded  # the tasks' config keys, not their code


def test_a_run_s_plan_is_its_named_rules_in_order_lora_then_presets_then_param_rules():
    cfg = small_config("llama", **{"model.lora_rank": 4, "model.lora_targets": ("q", "v"),
                                   "optimizer.freeze": " embeddings + ",
                                   "optimizer.param_rules": (*DEFAULT_PARAM_RULES, (r"^head/", "lr=0.5"))})
    parts = Components.from_config(cfg)
    names = [name for name, _ in named_param_rules(cfg, parts.model_def.cfg, parts.task)]
    assert names == ["model.lora_rank (LoRA freezes the base)", "model.lora_rank (LoRA trains the adapters)",
                     "optimizer.freeze='embeddings'", "optimizer.param_rules[0]", "optimizer.param_rules[1]",
                     "optimizer.param_rules[2]"]
    trained = sorted(p for p, t in parts.plan.trainable.items() if t)
    assert trained and all("/lora_w" in p for p in trained), trained
    assert parts.plan == ParamPlan.for_run(cfg, parts.model_def, parts.task)
    assert parts.plan.lr_scales({"head": {"w": 0}})["head"]["w"] == 0.5
    some = {"embed": 0, "head": {"w": 0}, "blocks": {"attn": {"wq": 0}}}
    assert parts.plan.decay_mask(some) == {"embed": False, "head": {"w": False}, "blocks": {"attn": {"wq": True}}}


@pytest.mark.parametrize("check, message", [
    (lambda: check_param_rules(((r"x", "lr=nan"),)), r"optimizer\.param_rules\[0\]: label 'lr=nan' needs a finite"),
    (lambda: check_param_rules(((r"x", "freeze_layers=3-1"),)), r"'freeze_layers=3-1' needs a block range"),
    (lambda: freeze_presets("embeddings+blocks:0", 2), r"optimizer\.freeze='blocks:0': the model has 2 blocks"),
    (lambda: check_lora(small_config("gpt2", **{"model.lora_rank": 4, "model.lora_targets": ("gate",)}).model),
     r"model\.lora_targets: 'gate' matches no projection of this model"),
    (lambda: check_lora(small_config("llama", **{"model.lora_rank": 99, "model.lora_targets": ("q",)}).model),
     r"model\.lora_rank=99 is above the smaller dimension of the 'q' projection"),
])
def test_rule_errors_name_the_user_s_key(check, message):
    with pytest.raises(ConfigError, match=message):
        check()


def test_validate_reports_a_bad_rule_as_a_config_error():
    with pytest.raises(ConfigError, match=r"optimizer\.param_rules\[1\]: regex '\(' does not compile"):
        validate(small_config("llama", **{"optimizer.param_rules": ((r"x", "decay"), (r"(", "train"))}), 1)
