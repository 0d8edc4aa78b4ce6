"""Each task's own keys under `config.task`: their defaults, what they do, and their checks.

A task names its options class (`Task.options`). The classes live here, apart from the task modules, because
`lmtrain.config` builds its defaults and validates a config from them without loading the model code (no
JAX): a task module imports the model, this module imports nothing heavy. A plugin task defines its own
TaskOptions subclass beside it; registering the task brings its keys into every config.
"""

from __future__ import annotations

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


# the options of the tasks in lmtrain.tasks.TASKS
BUILTIN_OPTIONS = (SftOptions, ClassifyOptions, MlmOptions, SpanCorruptionOptions)
