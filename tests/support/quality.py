"""Floors for figures measured on a labelled sample (tagging quality, the feedparser corpus).

A floor is a one-sided 95% confidence bound of the figure measured when the floor was set, for
that sample's size: what the sample can vouch for. A re-measurement below it says the change made
things worse by more than the sample's noise; one or two examples flipping does not fail.
"""
from __future__ import annotations

import math

Z = 1.645  # one-sided 95%


def _wilson(successes: int, trials: int, sign: int) -> float:
    if trials <= 0 or not 0 <= successes <= trials:
        raise ValueError(f"{successes} of {trials} is not a proportion")
    rate = successes / trials
    centre = rate + Z * Z / (2 * trials)
    spread = Z * math.sqrt(rate * (1 - rate) / trials + Z * Z / (4 * trials * trials))
    return (centre + sign * spread) / (1 + Z * Z / trials)


def lower_bound(successes: int, trials: int) -> float:
    """Wilson score lower bound of the rate successes/trials (precision, recall, agreement)."""
    return _wilson(successes, trials, -1)


def upper_bound(successes: int, trials: int) -> float:
    """Wilson score upper bound (a rate that must stay low, such as false positives)."""
    return _wilson(successes, trials, +1)


def f1_lower_bound(tp: int, fp: int, fn: int) -> float:
    """F1 at the precision and recall lower bounds: F1 grows with both, so it holds whenever both
    bounds do (at least 90% together)."""
    precision, recall = lower_bound(tp, tp + fp), lower_bound(tp, tp + fn)
    return 2 * precision * recall / (precision + recall)
