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
BUILTIN_OPTIONS = (SftOptions, ClassifyOptions, MlmOptions, DpoOptions, OrpoOptions)
