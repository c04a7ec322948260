"""The reader study's statistics: per-reader accuracy, sensitivity and specificity for "synthetic" with an
exact binomial test against chance, mean ratings, and inter-reader agreement (Cohen's and Fleiss' kappa,
in exact rational arithmetic: a few lines, checkable against hand-worked examples)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import numpy as np

from vmddpm.readerstudy.format import CHANCE, RATINGS, REAL, SYNTHETIC, TRUTHS, ReaderAnswers


def reader_scores(r: ReaderAnswers, key: dict[str, str]) -> dict[str, Any]:
    """Accuracy, sensitivity and specificity for "synthetic" (the positive class), an exact
    two-sided binomial test of the accuracy against chance, and mean ratings per true class."""
    from scipy.stats import binomtest

    tp = sum(1 for i, t in key.items() if t == SYNTHETIC and r.answers[i] == SYNTHETIC)
    fn = sum(1 for i, t in key.items() if t == SYNTHETIC and r.answers[i] == REAL)
    tn = sum(1 for i, t in key.items() if t == REAL and r.answers[i] == REAL)
    fp = sum(1 for i, t in key.items() if t == REAL and r.answers[i] == SYNTHETIC)
    n, correct = len(key), tp + tn
    test = binomtest(correct, n, CHANCE, alternative="two-sided")
    ci = test.proportion_ci(confidence_level=0.95, method="exact")
    sens = tp / (tp + fn) if tp + fn else None
    spec = tn / (tn + fp) if tn + fp else None
    means: dict[str, dict[str, float | None]] = {}
    for k in RATINGS:
        means[k] = {}
        for truth in TRUTHS:
            vals = [v for i, v in r.ratings[k].items() if key[i] == truth]
            means[k][truth] = float(np.mean(vals)) if vals else None
    return {
        "reader": r.reader,
        "file": str(r.path),
        "file_sha256": r.sha256,
        "n": n,
        "correct": correct,
        "tp": tp,
        "fn": fn,
        "tn": tn,
        "fp": fp,
        "accuracy": correct / n,
        "accuracy_ci95": [float(ci.low), float(ci.high)],
        "balanced_accuracy": (sens + spec) / 2 if sens is not None and spec is not None else None,
        "sensitivity": sens,
        "specificity": spec,
        "binom_p": float(test.pvalue),
        "realism": means["realism"],
        "plausibility": means["plausibility"],
    }


def cohen_kappa(a: Sequence[str], b: Sequence[str]) -> Fraction | None:
    """Cohen's kappa of two raters' labels of the same items, exactly; None when undefined (both
    raters give one and the same label to every item, so chance agreement is already 1)."""
    if len(a) != len(b) or not a:
        raise ValueError("two raters need the same, non-zero number of items")
    n = len(a)
    p_o = Fraction(sum(x == y for x, y in zip(a, b, strict=True)), n)
    ca, cb = Counter(a), Counter(b)
    p_e = sum((Fraction(ca[c], n) * Fraction(cb[c], n) for c in set(ca) | set(cb)), Fraction(0))
    return None if p_e == 1 else (p_o - p_e) / (1 - p_e)


def fleiss_kappa(labels: Sequence[Sequence[str]]) -> Fraction | None:
    """Fleiss' kappa of m >= 2 raters (rows: raters; columns: the same items), exactly; None when
    undefined (every rating is the same category)."""
    m = len(labels)
    if m < 2 or any(len(r) != len(labels[0]) for r in labels) or not labels[0]:
        raise ValueError("Fleiss' kappa needs >= 2 raters with the same, non-zero number of items")
    n_items = len(labels[0])
    counts = [Counter(r[i] for r in labels) for i in range(n_items)]  # n_ij per item
    categories = set().union(*counts)
    p_bar = sum((Fraction(sum(c * c for c in cnt.values()) - m, m * (m - 1)) for cnt in counts), Fraction(0))
    p_bar /= n_items
    p_j = {c: Fraction(sum(cnt[c] for cnt in counts), n_items * m) for c in categories}
    p_e = sum((p * p for p in p_j.values()), Fraction(0))
    return None if p_e == 1 else (p_bar - p_e) / (1 - p_e)


def agreement_scores(readers: Sequence[str], labels: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Cohen's kappa for two readers, Fleiss' kappa for three or more (and, from two readers on,
    Cohen's kappa of every pair, which shows who disagrees with whom)."""
    k = len(readers)
    pairs = [
        {"a": readers[i], "b": readers[j], "kappa": _float(cohen_kappa(labels[i], labels[j]))}
        for i in range(k)
        for j in range(i + 1, k)
    ]
    if k < 2:
        return {"method": None, "kappa": None, "n_readers": k, "pairwise_cohen": pairs}
    kappa = cohen_kappa(labels[0], labels[1]) if k == 2 else fleiss_kappa(labels)
    return {
        "method": "cohen" if k == 2 else "fleiss",
        "kappa": _float(kappa),
        "n_readers": k,
        "pairwise_cohen": pairs,
    }


def _float(x: Fraction | None) -> float | None:
    return None if x is None else float(x)


def json_safe(obj: Any) -> Any:
    """NaN never reaches JSON (it is not JSON): undefined numbers are null."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and obj != obj:
        return None
    return obj
