"""Evaluation metrics: classification (accuracy, F1, Matthews correlation) and generation (ROUGE-L, EM).

Metric names follow the tasks' conventions: ``mcc`` for CoLA, ``f1`` for MRPC/QQP (binary F1 of
the positive class; macro-F1 when there are more than two classes), ``accuracy`` elsewhere.
Values are fractions in [0, 1] (MCC in [-1, 1]); reports print them as percentages.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

import numpy as np

__all__ = ["CLASSIFICATION_METRICS", "classification_metrics", "exact_match", "normalize_answer", "rouge_l"]

CLASSIFICATION_METRICS = ("accuracy", "f1", "mcc")


def classification_metrics(
    predictions: Sequence[int] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    metrics: Sequence[str] = CLASSIFICATION_METRICS,
    num_labels: int | None = None,
) -> dict[str, float]:
    """Compute the named metrics of integer predictions against integer labels (equal lengths).

    ``f1`` is the positive class's for a two-class task and macro-F1 otherwise, the task's number of
    classes deciding (``num_labels``; without it, the labels and predictions seen): a many-class
    task evaluated where only classes 0 and 1 occur still gets macro-F1."""
    from sklearn.metrics import f1_score, matthews_corrcoef

    p, y = np.asarray(predictions), np.asarray(labels)
    if p.shape != y.shape or p.ndim != 1:
        raise ValueError(f"predictions {p.shape} and labels {y.shape} must be 1-D of equal length")
    if len(y) == 0:
        raise ValueError("no examples to evaluate")
    out: dict[str, float] = {}
    for m in metrics:
        if m == "accuracy":
            out[m] = float((p == y).mean())
        elif m == "f1":
            if num_labels is not None:
                binary = num_labels == 2
            else:
                binary = set(np.unique(y)) <= {0, 1} and set(np.unique(p)) <= {0, 1}
            out[m] = float(f1_score(y, p, average="binary" if binary else "macro", zero_division=0))
        elif m == "mcc":
            out[m] = float(matthews_corrcoef(y, p))
        else:
            raise ValueError(
                f"unknown classification metric {m!r}; known: {', '.join(CLASSIFICATION_METRICS)}"
            )
    return out


_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lower case, drop punctuation and articles, squeeze whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(r) for r in references))


_SCORER = None


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F-measure (``rouge_score``, Porter stemming, its default tokeniser that lower-cases
    and keeps ASCII alphanumerics), maximum over the references; in [0, 1]. This is the MiniLLM
    protocol's metric (they report it x 100)."""
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    if not references:
        raise ValueError("rouge_l needs at least one reference")
    return max(_SCORER.score(ref, prediction)["rougeL"].fmeasure for ref in references)
