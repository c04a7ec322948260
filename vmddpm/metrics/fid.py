"""FID, KID and the real-vs-real floor, from feature arrays (float64): pure maths, no files.

`frechet_distance` uses torch-fidelity's statistics when each set has at least as many samples as
feature dimensions; with fewer (every demo run) it computes the same number exactly in the n-dimensional
sample space (an n1 x n2 SVD instead of a d x d eigen-decomposition; tests compare it against
torch-fidelity and clean-fid).
"""

from __future__ import annotations

import numpy as np
import torch


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """FID between two feature sets.

    With n >= d samples per set, torch-fidelity's `fid_statistics_to_metric`. With fewer (rank-deficient
    covariances), the exact identity tr sqrt(S1 S2) = ||A1 A2^T||_* with S = A^T A, A = centred
    features / sqrt(n - 1), which needs an n1 x n2 SVD instead of a d x d eigen-decomposition.
    """
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    if len(f1) < 2 or len(f2) < 2:
        raise ValueError("FID needs at least 2 samples per set")
    d = f1.shape[1]
    if min(len(f1), len(f2)) >= d:
        s1 = fid_features_to_statistics(torch.from_numpy(f1))
        s2 = fid_features_to_statistics(torch.from_numpy(f2))
        return float(fid_statistics_to_metric(s1, s2, verbose=False)["frechet_inception_distance"])
    mu1, mu2 = f1.mean(0), f2.mean(0)
    a1 = (f1 - mu1) / np.sqrt(len(f1) - 1)
    a2 = (f2 - mu2) / np.sqrt(len(f2) - 1)
    tr_covmean = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum()
    diff = mu1 - mu2
    return float(diff @ diff + (a1 * a1).sum() + (a2 * a2).sum() - 2.0 * tr_covmean)


def kernel_distance(
    f1: np.ndarray, f2: np.ndarray, subset_size: int, subsets: int, seed: int
) -> tuple[float, float]:
    """KID mean and std over random subsets (torch-fidelity's polynomial-kernel MMD estimator)."""
    from torch_fidelity.metric_kid import kid_features_to_metric

    out = kid_features_to_metric(
        torch.from_numpy(np.asarray(f1, np.float64)),
        torch.from_numpy(np.asarray(f2, np.float64)),
        kid_subsets=subsets,
        kid_subset_size=subset_size,
        rng_seed=seed,
        verbose=False,
    )
    return float(out["kernel_inception_distance_mean"]), float(out["kernel_inception_distance_std"])


def real_floor(feats: np.ndarray, seed: int) -> float | None:
    """FID between two random halves of the real set: what 'as good as real data' scores at this N."""
    if len(feats) < 4:
        return None
    perm = np.random.default_rng(seed).permutation(len(feats))
    half = len(feats) // 2
    return frechet_distance(feats[perm[:half]], feats[perm[half : 2 * half]])
