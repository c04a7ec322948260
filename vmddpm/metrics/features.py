"""Features of uint8 images through an `Extractor`: torch-fidelity's preprocessing and clean-fid's.

Grayscale images are replicated to 3 channels; torch-fidelity's module takes uint8 and resizes with its
TF1-exact bilinear filter, clean-fid resizes with its anti-aliased PIL bicubic and reads the files itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vmddpm.metrics.extractor import Extractor


@torch.no_grad()
def extract_features(
    images: np.ndarray, ex: Extractor, batch_size: int, desc: str = "features"
) -> np.ndarray:
    """2048-d pool features of uint8 N x H x W images (grayscale replicated to 3 channels)."""
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False):
        x = torch.from_numpy(images[i : i + batch_size]).to(ex.device)
        x = x[:, None].expand(-1, 3, -1, -1).contiguous()
        out.append(ex.module(x)[0].double().cpu().numpy())
    return np.concatenate(out)


class _CleanFidModel:
    """clean-fid hands the model float images in [0, 255] already resized to 299 (PIL bicubic);
    torch-fidelity's module takes uint8 and its 299 -> 299 resize is the identity, so round to uint8
    (at most 0.5 grey levels) and reuse the very same network."""

    def __init__(self, ex: Extractor) -> None:
        self.ex = ex

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.round().clamp(0, 255).to(torch.uint8)
        return self.ex.module(x)[0].double()


def extract_clean_features(files: Sequence[Path], ex: Extractor, batch_size: int) -> np.ndarray:
    from cleanfid.fid import get_files_features

    return get_files_features(
        [str(f) for f in files],
        model=_CleanFidModel(ex),
        num_workers=0,
        batch_size=batch_size,
        device=ex.device,
        mode="clean",
        verbose=False,
    ).astype(np.float64)
