"""Task metrics for `lmtrain eval`: perplexity and bits per byte here, and the registry over them and the core's
scores (lmtrain.tasks.scores: classification scores with the confusion matrix, and generation scores: BLEU,
chrF, ROUGE-L, exact match), which the trainer's evaluations compute too.

Everything here is numpy and plain Python: the caller runs the model and hands over summed losses, predicted
labels or generated text. The registry `METRICS` says which task each metric fits, so a request that cannot
be answered (BLEU on a classifier, BLEU without references, any metric on an empty eval set) fails with a
message that says what to do instead.

Scales follow the tools that define each metric: BLEU and chrF are 0-100 (sacrebleu), ROUGE-L F-measure,
exact match, accuracy, precision, recall and F1 are 0-1.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Sequence

from lmtrain.errors import EvalError
from lmtrain.tasks.scores import bleu, chrf, classification_metrics, exact_match, rouge_l

TASKS = ("lm", "sft", "classify")


# ----------------------------------------------------------------------------- language modelling


def perplexity(nats_sum: float, tokens: int) -> float:
    """exp(mean negative log-likelihood per token). Capped at exp(50) so a diverged model gives a number, not inf."""
    if tokens <= 0:
        raise EvalError("perplexity: the eval set has no tokens to score. Give a non-empty eval set.")
    return math.exp(min(nats_sum / tokens, 50.0))


def bits_per_byte(nats_sum: float, n_bytes: int) -> float:
    """Summed nats over the UTF-8 bytes they encode, in bits: comparable across tokenizers, unlike perplexity."""
    if n_bytes <= 0:
        raise EvalError("bits_per_byte: the eval set has no bytes of text. Give a non-empty eval set.")
    return nats_sum / (n_bytes * math.log(2.0))


# ----------------------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class Metric:
    name: str
    tasks: tuple[str, ...]  # the tasks it fits
    inputs: str  # 'loss' (nats, tokens, bytes), 'classes' (labels, preds, label names) or 'text' (generations, references)
    higher_is_better: bool
    description: str
    fn: Callable | None = None  # for 'text' metrics: (generations, references) -> float


METRICS: dict[str, Metric] = {}


def register_metric(metric: Metric) -> Metric:
    """Add a metric; a new task lists itself in the `tasks` of the metrics that fit it."""
    METRICS[metric.name] = metric
    return metric


for _m in (
    Metric("perplexity", ("lm", "sft"), "loss", False, "exp of the mean loss per scored token"),
    Metric("bits_per_byte", ("lm", "sft"), "loss", False, "summed loss in bits over the UTF-8 bytes scored"),
    Metric("accuracy", ("classify",), "classes", True, "share of examples classified right"),
    Metric("precision", ("classify",), "classes", True, "macro and per-class precision"),
    Metric("recall", ("classify",), "classes", True, "macro and per-class recall"),
    Metric("f1", ("classify",), "classes", True, "macro and per-class F1"),
    Metric("confusion_matrix", ("classify",), "classes", True, "counts of [true label, predicted label]"),
    Metric("bleu", ("sft",), "text", True, "corpus BLEU, 0-100 (sacrebleu)", bleu),
    Metric("chrf", ("sft",), "text", True, "corpus chrF, 0-100 (sacrebleu)", chrf),
    Metric("rouge_l", ("sft",), "text", True, "ROUGE-L F-measure averaged over examples, 0-1", rouge_l),
    Metric("exact_match", ("sft",), "text", True, "share of generations equal to a reference (whitespace-normalised)",
           exact_match),
):
    register_metric(_m)

DEFAULT_METRICS = {
    "lm": ("perplexity", "bits_per_byte"),
    "sft": ("perplexity", "bleu", "chrf", "rouge_l", "exact_match"),
    "classify": ("accuracy", "precision", "recall", "f1", "confusion_matrix"),
}

# Which result keys each classification metric contributes.
_CLASS_KEYS = {
    "accuracy": ("accuracy",),
    "precision": ("precision_macro",),
    "recall": ("recall_macro",),
    "f1": ("f1_macro",),
    "confusion_matrix": ("confusion_matrix",),
}


def check_metrics(task: str, names: Sequence[str] | None) -> tuple[str, ...]:
    """The metric names to compute for `task` (its defaults when `names` is None); a name that is unknown or
    does not fit the task is an error that lists the ones that do."""
    if task not in TASKS:
        raise EvalError(f"unknown task '{task}'. Known tasks: {', '.join(TASKS)}.")
    if names is None:
        return DEFAULT_METRICS[task]
    fitting = [m.name for m in METRICS.values() if task in m.tasks]
    if not names:
        raise EvalError(f"no metrics asked for. Metrics for task '{task}': {', '.join(fitting)}.")
    for name in names:
        if name not in METRICS:
            close = difflib.get_close_matches(name, list(METRICS), n=3)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise EvalError(f"unknown metric '{name}'.{hint} Metrics for task '{task}': {', '.join(fitting)}.")
        if task not in METRICS[name].tasks:
            raise EvalError(f"metric '{name}' does not fit task '{task}' (it fits: {', '.join(METRICS[name].tasks)}). "
                            f"Metrics for task '{task}': {', '.join(fitting)}.")
    return tuple(dict.fromkeys(names))


def compute_metrics(task: str, names: Sequence[str] | None = None, *,
                    nats_sum: float | None = None, tokens: int | None = None, n_bytes: int | None = None,
                    labels: Sequence[int] | None = None, preds: Sequence[int] | None = None,
                    label_names: Sequence[str] | None = None,
                    generations: Sequence[str] | None = None,
                    references: Sequence[str | Sequence[str]] | None = None) -> dict:
    """Compute the metrics `names` (the task's defaults when None) from what the evaluation collected.

    Returns a flat dict of floats, plus for classification `per_class`, `confusion_matrix` and `labels`.
    `loss` and `tokens` come along whenever a loss metric was asked for.
    """
    names = check_metrics(task, names)
    out: dict = {}
    needs = {METRICS[n].inputs for n in names}
    if "loss" in needs:
        if nats_sum is None or tokens is None:
            raise EvalError("perplexity and bits_per_byte need the summed loss and the token count of the eval set.")
        if tokens <= 0:
            raise EvalError("the eval set is empty (0 tokens scored). Give a non-empty eval set.")
        out["loss"] = nats_sum / tokens
        out["tokens"] = int(tokens)
        if "perplexity" in names:
            out["perplexity"] = perplexity(nats_sum, tokens)
        if "bits_per_byte" in names:
            if n_bytes is None:
                raise EvalError("bits_per_byte needs the byte count of the scored text; it was not given.")
            out["bits_per_byte"] = bits_per_byte(nats_sum, n_bytes)
            out["bytes"] = int(n_bytes)
    if "classes" in needs:
        if labels is None or preds is None or label_names is None:
            raise EvalError("classification metrics need labels, predictions and the label list.")
        scores = classification_metrics(labels, preds, label_names)
        for n in names:
            for key in _CLASS_KEYS.get(n, ()):
                out[key] = scores[key]
        if {"precision", "recall", "f1"} & set(names):
            out["per_class"] = scores["per_class"]
        out["labels"] = scores["labels"]
        out["examples"] = len(labels)
    if "text" in needs:
        if generations is None or len(generations) == 0:
            raise EvalError("the eval set is empty (0 examples to generate for). Give a non-empty eval set.")
        for n in names:
            if METRICS[n].inputs == "text":
                out[n] = METRICS[n].fn(generations, references)
        out["examples"] = len(generations)
    return out


def higher_is_better(metric: str) -> bool | None:
    """Direction of a metric name as training logs it (`val_loss`, `val_accuracy`, `f1_macro`, ...); None if unknown."""
    name = metric.removeprefix("val_").removeprefix("eval_")
    if name in ("loss", "perplexity", "bits_per_byte") or name.endswith("_loss"):
        return False
    for key in ("accuracy", "precision", "recall", "f1", "bleu", "chrf", "rouge_l", "exact_match"):
        if name == key or name.startswith(key + "_") or name.endswith("_" + key):
            return True
    return None
