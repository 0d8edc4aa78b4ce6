"""What a task is: how examples become batches, the loss the step differentiates, and how evaluation
sums become metrics. The trainer, the step and the model know no task; they call these.

A task's `loss_fn(params, batch, rng) -> (loss_sum, weight, metric_sums)` returns sums over the batch
and the weight they are summed over; `eval_step(params, batch) -> sums` is jitted by the trainer and
summed over the validation set on device; `eval_metrics(sums)` turns those totals into metrics on the
host. `METRIC_MODES` says, for each metric the task reports, whether lower or higher is better.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax

from lmtrain.config import ConfigError
from lmtrain.model import ModelConfig, ModelDef


class Task:
    name: str = ""
    head: str = "lm"  # the model head this task trains (lmtrain.model.heads.HEADS)
    METRIC_MODES: dict[str, str] = {"val_loss": "min"}

    def __init__(self, cfg):
        self.cfg = cfg

    def model_config(self) -> ModelConfig:
        """The model this task trains: `config.model` with the task's head (training keeps fp32 masters)."""
        model_cfg = ModelConfig.from_config(self.cfg.model)
        return dataclasses.replace(model_cfg, head=self.head).for_training()

    def make_data(self, workdir, data_index: int, data_count: int):
        """A lmtrain.data.pipeline.DataBundle for this data slice of the global batch."""
        raise NotImplementedError

    def loss_fn(self, model_def: ModelDef) -> Callable:
        raise NotImplementedError

    def eval_step(self, model_def: ModelDef) -> Callable[[dict, dict], dict]:
        raise NotImplementedError

    def eval_metrics(self, sums: dict) -> dict[str, float]:
        raise NotImplementedError

    def extra_eval(self, model_def: ModelDef, params: dict, data) -> dict[str, float]:
        """Metrics a summed eval step cannot give (scores of generated text, say), merged into each evaluation's.
        Every process calls it with the same arguments; `data` is the run's DataBundle."""
        return {}

    def write_eval_artifacts(self, sums: dict, workdir) -> list[str]:
        """Pictures or tables drawn from the final evaluation (e.g. a confusion matrix); their paths."""
        return []

    def metric_mode(self, metric: str, key: str = "train.early_stopping.metric") -> str:
        if metric not in self.METRIC_MODES:
            raise ConfigError(f"{key}='{metric}' is not a metric of task '{self.name}'. "
                              f"Choose one of: {', '.join(self.METRIC_MODES)}.")
        return self.METRIC_MODES[metric]


def default_mode(metric: str) -> str:
    """Whether lower ('min') or higher ('max') is better for a metric, by its name."""
    lower_is_better = ("loss", "perplexity", "bpb", "bits_per_byte", "error")
    return "min" if any(word in metric for word in lower_is_better) else "max"


def dropout_key(model_cfg: ModelConfig, rng: jax.Array | None) -> jax.Array | None:
    """The dropout key to pass the model: None when dropout is off, so no random bits are drawn."""
    rates = (model_cfg.dropout, model_cfg.lora_dropout, model_cfg.attention_dropout, model_cfg.classifier_dropout)
    return rng if (rng is not None and max(rates) > 0) else None
