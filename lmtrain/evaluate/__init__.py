"""Evaluation: task metrics (`metrics.py`) and the JSON and HTML reports (`report.py`) of `lmtrain eval`."""

from lmtrain.evaluate.metrics import METRICS, EvalError, check_metrics, compute_metrics

__all__ = ["METRICS", "EvalError", "check_metrics", "compute_metrics"]
