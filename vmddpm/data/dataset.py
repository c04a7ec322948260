"""The one Dataset over prepared slices (the manifest itself is read by `vmddpm.contracts`).

Why flips only: medical images have a fixed anatomy and intensity meaning; crops, rotations or
intensity jitter would change what "real" looks like for FID. Horizontal flips keep it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from vmddpm.contracts import split_files
from vmddpm.errors import UserError


def _hint(prepared_dir: Path) -> str:
    return f"run `vmddpm prepare --dataset {Path(prepared_dir).name}`"


class SliceDataset(Dataset):
    """(1, H, W) float32 tensors in [-1, 1] of one split; random horizontal flips if `hflip`.

    `image_size`, when given, must match the prepared slices (a mismatch means prepare ran with
    another `data.image_size`).
    """

    def __init__(
        self,
        prepared_dir: str | Path,
        split: str = "train",
        hflip: bool = False,
        image_size: int | None = None,
    ) -> None:
        self.root = Path(prepared_dir)
        self.files = split_files(self.root, split)
        self.hflip = hflip
        if not self.files:
            raise UserError(
                f"{self.root / 'manifest.csv'}: no slices with split == {split}; {_hint(self.root)} "
                "(with more subjects or another data.split)"
            )
        if image_size is not None:
            size = self._load(0).shape[-1]
            if size != image_size:
                raise UserError(
                    f"{self.root}: slices are {size}x{size} but data.image_size is {image_size}; "
                    f"{_hint(self.root)} again"
                )

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, i: int) -> np.ndarray:
        path = self.files[i]
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("L"), dtype=np.float32)
        except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
            raise UserError(f"{path}: cannot read the slice ({e}); {_hint(self.root)} again") from None
        return arr

    def __getitem__(self, i: int) -> torch.Tensor:
        x = torch.from_numpy(self._load(i) / 127.5 - 1.0)[None]
        if self.hflip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x
