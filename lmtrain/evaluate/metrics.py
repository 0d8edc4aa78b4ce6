"""Task metrics for `lmtrain eval` and the trainer's evaluations: perplexity and bits per byte, classification
scores with the confusion matrix, and generation scores (BLEU, chrF, ROUGE-L, exact match).

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

import numpy as np

TASKS = ("lm", "sft", "classify")


class EvalError(ValueError):
    """An evaluation request that cannot be answered. The message says what is wrong and what to do."""


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


# ----------------------------------------------------------------------------- classification


def confusion_matrix(labels: Sequence[int], preds: Sequence[int], n_classes: int) -> np.ndarray:
    """counts_CxC[true, predicted]."""
    labels_N, preds_N = _check_class_ids(labels, preds, n_classes)
    counts_CxC = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(counts_CxC, (labels_N, preds_N), 1)
    return counts_CxC


def classification_metrics(labels: Sequence[int], preds: Sequence[int], label_names: Sequence[str],
                           zero_division: float = 0.0) -> dict:
    """Accuracy, macro and per-class precision/recall/F1, and the confusion matrix, from per-example class ids.

    A ratio whose denominator is zero (precision of a class never predicted, recall of a class absent from
    the eval set) is `zero_division` (0.0 as in scikit-learn's default; NaN leaves it out of the macro mean).
    Macro means run over every class in `label_names`, as scikit-learn's do with `labels=` given, so a class
    the eval set lacks still counts: the report shows its support of 0 next to it.
    """
    if not label_names:
        raise EvalError("classification metrics need the label list (the labels saved with the run); it is empty.")
    return classification_metrics_from_counts(confusion_matrix(labels, preds, len(label_names)), label_names,
                                              zero_division)


def classification_metrics_from_counts(counts: Sequence[Sequence[int]] | np.ndarray, label_names: Sequence[str],
                                       zero_division: float = 0.0) -> dict:
    """The same metrics from a confusion matrix counts[true, predicted], e.g. one summed on device during training."""
    counts_CxC = np.asarray(counts).astype(np.int64)
    if counts_CxC.shape != (len(label_names), len(label_names)):
        raise EvalError(f"classification metrics: a {counts_CxC.shape} confusion matrix does not fit "
                        f"{len(label_names)} labels.")
    if counts_CxC.sum() == 0:
        raise EvalError("classification metrics: the eval set is empty (0 examples). Give a non-empty eval set.")
    tp_C = np.diag(counts_CxC).astype(np.float64)
    predicted_C = counts_CxC.sum(axis=0).astype(np.float64)
    support_C = counts_CxC.sum(axis=1).astype(np.float64)
    precision_C = _ratio(tp_C, predicted_C, zero_division)
    recall_C = _ratio(tp_C, support_C, zero_division)
    # F1 from counts (2tp / (2tp + fp + fn)), as scikit-learn >= 1.3 does: defined whenever the class appears
    # in the labels or the predictions, even where precision or recall alone divides by zero.
    f1_C = _ratio(2 * tp_C, predicted_C + support_C, zero_division)
    per_class = {
        name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(label_names, precision_C, recall_C, f1_C, support_C)
    }
    return {
        "accuracy": float(tp_C.sum() / counts_CxC.sum()),
        "precision_macro": _nanmean(precision_C),
        "recall_macro": _nanmean(recall_C),
        "f1_macro": _nanmean(f1_C),
        "per_class": per_class,
        "confusion_matrix": counts_CxC.tolist(),
        "labels": list(label_names),
    }


def _check_class_ids(labels: Sequence[int], preds: Sequence[int], n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    labels_N, preds_N = np.asarray(labels), np.asarray(preds)
    if labels_N.ndim != 1 or preds_N.ndim != 1 or len(labels_N) != len(preds_N):
        raise EvalError(f"classification metrics: {len(labels_N)} labels but {len(preds_N)} predictions; "
                        "give one prediction per example.")
    if len(labels_N) == 0:
        raise EvalError("classification metrics: the eval set is empty (0 examples). Give a non-empty eval set.")
    for what, ids in (("label", labels_N), ("prediction", preds_N)):
        if not np.issubdtype(ids.dtype, np.integer):
            raise EvalError(f"classification metrics: {what}s must be integer class ids, got dtype {ids.dtype}.")
        bad = ids[(ids < 0) | (ids >= n_classes)]
        if len(bad):
            raise EvalError(f"classification metrics: {what} id {int(bad[0])} is outside the {n_classes} known "
                            f"classes (0..{n_classes - 1}). Was the eval set labelled with the run's label list?")
    return labels_N, preds_N


def _ratio(num: np.ndarray, den: np.ndarray, zero_division: float) -> np.ndarray:
    out = np.full(num.shape, float(zero_division))
    np.divide(num, den, out=out, where=den > 0)
    return out


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if len(x) else float("nan")


# ----------------------------------------------------------------------------- generation


def _reference_streams(generations: Sequence[str], references: Sequence[str | Sequence[str]] | None,
                       metric: str) -> list[list[str]]:
    """Per-example references (one string or several) as a list of lists, checked against the generations."""
    if not generations:
        raise EvalError(f"{metric}: the eval set is empty (0 examples). Give a non-empty eval set.")
    if references is None:
        raise EvalError(f"{metric} needs references, and the eval set has none. Give examples with a reference "
                        "(the 'completion' field, or the assistant's last turn), or ask only for metrics "
                        "that need none (perplexity).")
    if len(references) != len(generations):
        raise EvalError(f"{metric}: {len(generations)} generations but {len(references)} references; "
                        "give one reference (or a list of them) per example.")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    for i, r in enumerate(refs):
        if not r or any(not isinstance(x, str) for x in r):
            raise EvalError(f"{metric}: example {i} has no reference text ({references[i]!r}). "
                            "Every example needs at least one reference string.")
    return refs


def bleu(generations: Sequence[str], references: Sequence[str | Sequence[str]] | None) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenizer, exponential smoothing), 0-100."""
    import sacrebleu

    refs = _reference_streams(generations, references, "bleu")
    return float(sacrebleu.corpus_bleu(list(generations), _transpose(refs)).score)


def chrf(generations: Sequence[str], references: Sequence[str | Sequence[str]] | None) -> float:
    """Corpus chrF (sacrebleu, character 6-grams, beta 2), 0-100."""
    import sacrebleu

    refs = _reference_streams(generations, references, "chrf")
    return float(sacrebleu.corpus_chrf(list(generations), _transpose(refs)).score)


def _transpose(refs: list[list[str]]) -> list[list[str | None]]:
    """sacrebleu takes reference *streams* (the i-th reference of every example); None fills a short list."""
    n = max(len(r) for r in refs)
    return [[r[k] if k < len(r) else None for r in refs] for k in range(n)]


def rouge_l(generations: Sequence[str], references: Sequence[str | Sequence[str]] | None) -> float:
    """ROUGE-L F-measure (rouge-score, default tokenizer, no stemming) averaged over examples, 0-1.

    With several references an example takes its best one, as rouge-score's `score_multi` does.
    """
    from rouge_score import rouge_scorer

    refs = _reference_streams(generations, references, "rouge_l")
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    scores = [scorer.score_multi(r, g)["rougeL"].fmeasure for g, r in zip(generations, refs)]
    return float(np.mean(scores))


def normalize_whitespace(text: str) -> str:
    return " ".join(text.split())


def exact_match(generations: Sequence[str], references: Sequence[str | Sequence[str]] | None) -> float:
    """Share of generations equal to a reference after collapsing whitespace (case and punctuation count), 0-1."""
    refs = _reference_streams(generations, references, "exact_match")
    hits = [normalize_whitespace(g) in {normalize_whitespace(x) for x in r} for g, r in zip(generations, refs)]
    return float(np.mean(hits))


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
