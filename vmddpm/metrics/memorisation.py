"""Memorisation check: how close each generated image is to its nearest training image (pixels).

A model that copies its training set scores a good FID; the share of generated images within
`eval.memorisation_threshold` (mean absolute pixel distance in [0, 1]) of a training image says so.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def nearest_distances(
    fake: np.ndarray, train: np.ndarray, hflip: bool, device: torch.device | None = None, chunk: int = 64
) -> np.ndarray:
    """Per generated image: mean-abs pixel distance (0..1) to its nearest training image.

    With `hflip` (the training augmentation) the mirrored training images count too: a model trained
    on flips can memorise either orientation. Mirroring the fake instead of the reference keeps memory
    at one copy of the training set.
    """
    if fake.shape[1:] != train.shape[1:]:
        raise ValueError(f"image sizes differ: generated {fake.shape[1:]}, training {train.shape[1:]}")
    device = device or torch.device("cpu")
    ref = torch.from_numpy(train.reshape(len(train), -1)).to(device).float().div_(255.0)
    d = ref.shape[1]
    best = []
    for i in range(0, len(fake), chunk):
        x = torch.from_numpy(fake[i : i + chunk]).to(device).float().div_(255.0)
        dist = torch.cdist(x.reshape(len(x), -1), ref, p=1).min(1).values
        if hflip:
            xf = x.flip(-1).reshape(len(x), -1)
            dist = torch.minimum(dist, torch.cdist(xf, ref, p=1).min(1).values)
        best.append(dist / d)
    return torch.cat(best).cpu().numpy().astype(np.float64)


def memorisation(
    fake: np.ndarray, train: np.ndarray, threshold: float, hflip: bool, device: torch.device | None = None
) -> dict[str, Any]:
    dist = nearest_distances(fake, train, hflip, device)
    count = int((dist < threshold).sum())
    return {
        "memorised_share": count / len(dist),
        "memorised_count": count,
        "nn_distance_min": float(dist.min()),
        "nn_distance_median": float(np.median(dist)),
        "memorisation_threshold": threshold,
        "memorisation_metric": "pixel mean-abs distance in [0,1] to the nearest training image"
        + (" (or its mirror)" if hflip else ""),
    }
