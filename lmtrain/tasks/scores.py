"""Scores of what a model predicted, as the tasks' evaluations and `lmtrain eval` compute them: classification
scores from class ids or a confusion matrix, and generation scores (BLEU, chrF, ROUGE-L, exact match) of
generated text against references.

Everything here is numpy and plain Python: the caller runs the model and hands over labels, predictions or
generated text. Scales follow the tools that define each metric: BLEU and chrF are 0-100 (sacrebleu),
ROUGE-L F-measure, exact match, accuracy, precision, recall and F1 are 0-1.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lmtrain.errors import EvalError

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


# The generation scores by name, as training logs them (val_<name>) and `lmtrain eval` reports them.
TEXT_SCORES = {"bleu": bleu, "chrf": chrf, "rouge_l": rouge_l, "exact_match": exact_match}
