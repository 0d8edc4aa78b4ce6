"""Each task's own keys under `config.task`: their defaults, what they do, and their checks.

A task names its options class (`Task.options`). The classes live here, apart from the task modules, because
`lmtrain.config` builds its defaults and validates a config from them without loading the model code (no
JAX): a task module imports the model, this module imports nothing heavy. A plugin task defines its own
TaskOptions subclass beside it; registering the task brings its keys into every config.
"""

from __future__ import annotations

import re

from lmtrain.errors import ConfigError


class TaskOptions:
    """No keys of its own. `defaults` maps each key to its default; `validate(cfg)` checks their values and runs
    for every known task, whichever one trains (a mistyped value is an error even while it is unused)."""

    defaults: dict = {}

    @classmethod
    def validate(cls, cfg) -> None:
        pass


class SftOptions(TaskOptions):
    defaults = {
        # At each evaluation, generate greedily (KV cache) for the first N validation examples and log val_bleu,
        # val_chrf, val_rouge_l and val_exact_match against their completions; 0 disables.
        "eval_generate_examples": 16,
    }

    @classmethod
    def validate(cls, cfg) -> None:
        if cfg.task.eval_generate_examples < 0:
            raise ConfigError(f"task.eval_generate_examples={cfg.task.eval_generate_examples} must not be negative.")


class ClassifyOptions(TaskOptions):
    defaults = {
        "class_weights": (),  # one loss weight per class, in the data's class order; () for equal weights
    }

    @classmethod
    def validate(cls, cfg) -> None:
        if any(w < 0 for w in cfg.task.class_weights):
            raise ConfigError("task.class_weights must not be negative.")


class MlmOptions(TaskOptions):
    defaults = {
        "mask_prob": 0.15,  # share of tokens predicted; of them 80% become the mask token, 10% random, 10% kept
        "whole_word_mask": False,  # choose whole words (all of a word's WordPiece pieces together)
    }

    @classmethod
    def validate(cls, cfg) -> None:
        if not 0.0 < cfg.task.mask_prob < 1.0:
            raise ConfigError(f"task.mask_prob={cfg.task.mask_prob} must lie in (0, 1); BERT uses 0.15.")


class GrpoOptions(TaskOptions):
    defaults = {
        "grpo_group_size": 4,  # G: completions sampled per prompt; advantages compare the G with each other
        "grpo_max_new_tokens": 16,  # tokens sampled per completion (fewer when EOS comes first)
        "grpo_temperature": 1.0,  # sampling temperature of the rollouts (> 0)
        "grpo_top_p": 1.0,  # nucleus sampling of the rollouts (1.0: off)
        "grpo_clip_eps": 0.2,  # the ratio is clipped to [1 - eps, 1 + eps]
        "grpo_kl_coef": 0.04,  # beta: weight of the KL penalty to the reference model (0: none)
        "grpo_scale_std": True,  # divide advantages by the group's std (GRPO); False: Dr. GRPO's mean-centred only
        # 'exact_match', 'regex:PATTERN' (its first match, group 1 if any, equals the reference answer), or
        # 'module:function' called with (prompts, completions[, references=]) returning one float per completion
        "grpo_reward": "exact_match",
        "grpo_eval_prompts": 16,  # validation prompts answered greedily at each evaluation (val_reward); 0: none
    }

    @classmethod
    def validate(cls, cfg) -> None:
        t = cfg.task
        if t.grpo_group_size < 2:
            raise ConfigError(f"task.grpo_group_size={t.grpo_group_size}: GRPO compares completions within a group, "
                              "so it needs at least 2 per prompt.")
        if t.grpo_kl_coef < 0:
            raise ConfigError(f"task.grpo_kl_coef={t.grpo_kl_coef} must not be negative (0 turns the KL penalty off).")
        if t.grpo_max_new_tokens < 1:
            raise ConfigError(f"task.grpo_max_new_tokens={t.grpo_max_new_tokens} must be at least 1.")
        if not t.grpo_temperature > 0:
            raise ConfigError(f"task.grpo_temperature={t.grpo_temperature} must be positive: rollouts are sampled.")
        if not 0 < t.grpo_top_p <= 1:
            raise ConfigError(f"task.grpo_top_p={t.grpo_top_p} must lie in (0, 1] (1: off).")
        if not t.grpo_clip_eps > 0:
            raise ConfigError(f"task.grpo_clip_eps={t.grpo_clip_eps} must be positive.")
        if t.grpo_eval_prompts < 0:
            raise ConfigError(f"task.grpo_eval_prompts={t.grpo_eval_prompts} must not be negative.")
        spec = str(t.grpo_reward)
        if spec != "exact_match" and not spec.startswith("regex:") and ":" not in spec:
            raise ConfigError(f"task.grpo_reward='{spec}': give 'exact_match', 'regex:PATTERN' or 'module:function'.")
        if spec.startswith("regex:"):
            try:
                re.compile(spec[len("regex:"):])
            except re.error as e:
                raise ConfigError(f"task.grpo_reward='{spec}': not a regular expression ({e}).") from None


class SpanCorruptionOptions(TaskOptions):
    defaults = {
        "noise_density": 0.15,  # span_corruption: share of each row's tokens hidden in spans (T5: 0.15)
        "mean_noise_span_length": 3.0,  # span_corruption: mean tokens per hidden span, each one sentinel (T5: 3)
    }

    @classmethod
    def validate(cls, cfg) -> None:
        if not 0.0 < cfg.task.noise_density < 1.0:
            raise ConfigError(f"task.noise_density={cfg.task.noise_density} must lie in (0, 1); T5 uses 0.15.")
        if cfg.task.mean_noise_span_length < 1.0:
            raise ConfigError(f"task.mean_noise_span_length={cfg.task.mean_noise_span_length} must be at least 1; "
                              "T5 uses 3.")


DPO_LOSSES = ("sigmoid", "ipo")


class DpoOptions(TaskOptions):
    defaults = {
        "dpo_beta": 0.1,  # how far the policy may move from the reference: the scale of the implicit reward
        # sigmoid: -log sigmoid(beta * margin) (Rafailov et al. 2023); ipo: (margin - 1 / (2 beta))^2 on per-token
        # mean log-probabilities (Azar et al. 2023), as TRL computes it
        "dpo_loss": "sigmoid",
        "dpo_label_smoothing": 0.0,  # sigmoid: the share of pairs assumed mislabelled (conservative DPO)
    }

    @classmethod
    def validate(cls, cfg) -> None:
        if not cfg.task.dpo_beta > 0:
            raise ConfigError(f"task.dpo_beta={cfg.task.dpo_beta} must be > 0; 0.1 is the usual value.")
        if cfg.task.dpo_loss not in DPO_LOSSES:
            raise ConfigError(f"task.dpo_loss='{cfg.task.dpo_loss}' is unknown; choose one of {', '.join(DPO_LOSSES)}.")
        if not 0.0 <= cfg.task.dpo_label_smoothing < 0.5:
            raise ConfigError(f"task.dpo_label_smoothing={cfg.task.dpo_label_smoothing} must lie in [0, 0.5).")
        if cfg.task.dpo_loss == "ipo" and cfg.task.dpo_label_smoothing:
            raise ConfigError("task.dpo_label_smoothing applies to task.dpo_loss=sigmoid only; set it to 0 for ipo.")


class OrpoOptions(TaskOptions):
    defaults = {
        "orpo_lambda": 0.1,  # the weight of the odds-ratio term beside the chosen completions' NLL (Hong et al. 2024)
    }

    @classmethod
    def validate(cls, cfg) -> None:
        if not cfg.task.orpo_lambda > 0:
            raise ConfigError(f"task.orpo_lambda={cfg.task.orpo_lambda} must be > 0; 0.1 is the paper's value.")


# the options of the tasks in lmtrain.tasks.TASKS
BUILTIN_OPTIONS = (SftOptions, ClassifyOptions, MlmOptions, GrpoOptions, SpanCorruptionOptions, DpoOptions,
                   OrpoOptions)
