"""What a task is: everything about it, declared in one class. The trainer, the step, the config and
`lmtrain eval` know no task; they call these.

- `formats`: the registered example formats (lmtrain.data.formats) it reads; `make_data` refuses others.
- `name`: its `task.name`, set by the registry (lmtrain.tasks: TASKS, or register_task for a plugin).
- `options`: its own keys under `config.task`, their defaults and checks (lmtrain.tasks.options).
- `head`: the model head it trains; `generates_text`: whether the end of training samples text from it.
- its loss, its evaluation sums and metrics (below), and `eval_kind`: the `lmtrain eval` scorer of its
  models (lmtrain.evaluate.metrics: 'lm', 'sft', 'classify'), or None for the generic scoring: its own
  `eval_step` summed over the evaluation split and `eval_metrics`.
- optionally, extra non-trained state: `init_aux(model_def, start_params)` and a pure `prepare(aux, batch)`
  that the trainer jits and runs on each batch before the train and eval steps (see `init_aux`).
- an on-policy task (`on_policy = True`, e.g. grpo) builds each training batch from the current parameters
  instead: the trainer calls `rollout(model_def, aux, params, batch, rng_data, step)` on the host, un-jitted,
  in place of `prepare` before the train step (evaluation still runs `prepare`).

A task's `loss_fn(params, batch, rng) -> (loss_sum, weight, metric_sums)` returns sums over the batch
and the weight they are summed over; `eval_step(params, batch) -> sums` is jitted by the trainer and
summed over the validation set on device; `eval_metrics(sums)` turns those totals into metrics on the
host. `METRIC_MODES` says, for each metric the task reports, whether lower or higher is better.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax

from lmtrain.data.pipeline import make_data
from lmtrain.errors import ConfigError
from lmtrain.model import ModelConfig, ModelDef
from lmtrain.tasks.options import TaskOptions


class Task:
    name: str = ""
    formats: tuple[str, ...] = ()  # the example formats it reads (lmtrain.data.formats names)
    head: str = "lm"  # the model head this task trains (lmtrain.model.heads.HEADS)
    generates_text: bool = False  # the model writes text: training ends with a sample of it
    has_labels: bool = False  # the model's classes come from the data (WORKDIR/labels.json)
    eval_kind: str | None = None  # the `lmtrain eval` scorer; None: the generic one (eval_step, eval_metrics)
    options: type[TaskOptions] = TaskOptions  # its own config.task keys (checks that need the data: __init__)
    METRIC_MODES: dict[str, str] = {"val_loss": "min"}

    def __init__(self, cfg):
        self.cfg = cfg

    def model_config(self) -> ModelConfig:
        """The model this task trains: `config.model` with the task's head (training keeps fp32 masters)."""
        if self.cfg.model.get("arch", "transformer") != "transformer":
            raise ConfigError(f"model.arch='{self.cfg.model.arch}' builds an encoder-decoder, which task.name="
                              f"{self.name} does not train; use task.name=seq2seq or span_corruption, or model.arch="
                              "'transformer'.")
        model_cfg = ModelConfig.from_config(self.cfg.model)
        return dataclasses.replace(model_cfg, head=self.head).for_training()

    def make_data(self, workdir, data_index: int, data_count: int):
        """A lmtrain.data.pipeline.DataBundle for this data slice of the global batch, of the task's formats."""
        return make_data(self.cfg, workdir, data_index, data_count, formats=self.formats)

    def init_aux(self, model_def: ModelDef, start_params: dict):
        """Extra state the task needs and never trains (a frozen reference model's parameters, say), or None.

        Built once per run from the config and `start_params`, the parameters training began with (the seed's
        initialisation, then train.init_from): a resumed run rebuilds the very same aux, so it is not saved in
        checkpoints and resume stays exact. It is never differentiated nor optimized."""
        return None

    def uses_aux(self) -> bool:
        """Whether the task declares extra state (its class overrides init_aux); for the others none is built."""
        return type(self).init_aux is not Task.init_aux

    def prepare(self, aux, batch: dict) -> dict:
        """A pure function of (aux, batch) -> batch, run (jitted) on every batch before the train step and the
        eval step when `init_aux` gives aux: e.g. a reference model's log-probabilities added as a batch key.
        The step still takes (params, batch, rng) and knows nothing of aux."""
        return batch

    on_policy: bool = False  # the training batch is sampled from the current parameters: `rollout` makes it

    def rollout(self, model_def: ModelDef, aux, params: dict, batch: dict, rng_data, step: int) -> dict:
        """An on-policy task's training batch, made on the host from the data's `batch` with the current `params`
        (all of them, trained and frozen) before step `step` runs. Randomness comes from `rng_data` (the train
        state's rng key data, saved in every checkpoint) and `step` only, so a resumed run samples what the
        straight run did. The step still takes (params, batch, rng)."""
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
