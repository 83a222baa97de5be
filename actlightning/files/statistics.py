"""Statistics of a vector column from its float64 sums (see ``Prediction.moments``), as SAE training
normalizes with them: count, mean and population variance per component, mean norm, mean squared norm."""

from __future__ import annotations

from typing import Any

import numpy as np


def statistics(sums: np.ndarray, count: int) -> dict[str, Any]:
    """``sums``: ``[2 * width + 2]`` float64 (component sums, component sums of squares, sum of norms,
    sum of squared norms) over ``count`` vectors."""
    width = (len(sums) - 2) // 2
    n = max(count, 1)
    mean = sums[:width] / n
    # Population variance, E[x^2] - E[x]^2, clipped at 0 (rounding can leave -1e-17 for a constant).
    var = np.maximum(sums[width : 2 * width] / n - mean * mean, 0.0)
    return {
        "count": int(count),
        "mean": mean,
        "var": var,
        "mean_norm": float(sums[-2] / n),
        "mean_squared_norm": float(sums[-1] / n),
    }
