"""The evaluation kit the evaluate and sweep stages share: the configured extractor, the reference set
and its cached features.

- `load_extractor(cfg)`: `eval.extractor` on `eval.device` (`vmddpm.metrics.extractor`).
- `reference_set(cfg, dataset)`: the real images FID compares against (`eval.reference_split` of the
  prepared manifest) and the training images the memorisation check compares against.
- `reference_features(cfg, ref, ex, tag)`: features (and clean-fid features, and the real-vs-real floor)
  of a reference set, cached on disk under `runs/.eval-cache/`; the key is the set's content digest +
  extractor + weights hash + protocol version, so a changed image, weight file or extraction rule never
  reuses stale features; the 11 evaluate jobs of a dataset start together: one extracts under a file
  lock, the others wait and read. An empty, truncated or otherwise unreadable cache file is recomputed
  (and rewritten) with a warning naming it.
- `TrainingEval`: FID/KID of a small generated set during training (`train.eval_every`), with the same
  extractor and the same cached reference features as the evaluate stage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vmddpm import cpu_memory
from vmddpm import io as vio
from vmddpm.config import Config
from vmddpm.contracts import MANIFEST, split_files
from vmddpm.errors import UserError
from vmddpm.metrics.extractor import Extractor, inception_weights_path
from vmddpm.metrics.extractor import load_extractor as _load_extractor
from vmddpm.metrics.features import extract_clean_features, extract_features
from vmddpm.metrics.fid import frechet_distance, kernel_distance, real_floor
from vmddpm.metrics.images import ImageSet, load_images
from vmddpm.runtime import resolve_device

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 2  # bump when feature extraction changes: invalidates the reference-feature caches


def load_extractor(cfg: Config) -> Extractor:
    """The configured Inception: real weights (sha256-checked) or the fixed-seed random network."""
    device = resolve_device(cfg.eval.device, "eval.device")
    weights = None
    if cfg.eval.extractor == "inception":
        configured = None
        if cfg.eval.inception_weights:
            configured = Path(cfg.eval.inception_weights).expanduser()
            if not configured.is_absolute():
                configured = cfg.root / configured
        weights = inception_weights_path(configured, cfg.source)
    ex = _load_extractor(cfg.eval.extractor, device, seed=cfg.seed, weights=weights)
    cpu_memory.configure(cfg.cpu_memory, device.type)
    return ex


def split_images(cfg: Config, dataset: str, split: str, what: str) -> ImageSet:
    """The PNGs of one split of the prepared dataset, loaded and validated."""
    prepared = cfg.prepared_dir(dataset)
    if not (prepared / MANIFEST).is_file():
        raise UserError(
            f"{prepared}: no prepared dataset (manifest.csv missing); "
            f"run `vmddpm prepare --dataset {dataset}`"
        )
    return load_images(list(split_files(prepared, split)), prepared, what)


def reference_set(cfg: Config, dataset: str) -> tuple[ImageSet, ImageSet]:
    """(reference images = `eval.reference_split`, training images for the memorisation check)."""
    split = cfg.eval.reference_split
    real = split_images(cfg, dataset, split, f"{split} split")
    train = real if split == "train" else split_images(cfg, dataset, "train", "train split")
    return real, train


def reference_tag(cfg: Config, dataset: str) -> str:
    return f"{dataset}-{cfg.eval.reference_split}"


def check_kid_size(cfg: Config, sets: Sequence[ImageSet]) -> None:
    for s in sets:
        if len(s) < cfg.eval.kid_subset_size:
            raise UserError(
                f"{s.folder}: {len(s)} images, fewer than eval.kid_subset_size={cfg.eval.kid_subset_size} "
                "(KID draws subsets of that size); lower eval.kid_subset_size (set in "
                f"{cfg.origin('eval.kid_subset_size')}) "
                "or provide more images"
            )


def cache_dir(cfg: Config) -> Path:
    return cfg.root / cfg.paths.runs / ".eval-cache"


def reference_features(cfg: Config, ref: ImageSet, ex: Extractor, tag: str) -> dict[str, Any]:
    """Features (and clean-fid features, and the floor) of the reference set, cached on disk.

    The key is the reference's content digest + extractor + weights hash + protocol version, so a
    changed image, weight file or extraction rule can never reuse stale features.
    """
    key_src = json.dumps(
        {
            "v": PROTOCOL_VERSION,
            "images": ref.digest,
            "extractor": ex.kind,
            "weights": ex.weights_sha256,
            "clean": cfg.eval.clean_fid,
            "seed": cfg.seed,
        },
        sort_keys=True,
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
    path = cache_dir(cfg) / f"{tag}-{key}.npz"
    cached = _read_reference_cache(cfg, path, key, warn=False)  # read again, and named, under the lock
    if cached is not None:
        return cached
    from filelock import FileLock

    # The 11 evaluate jobs of a dataset start together: one extracts, the others wait and read.
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock", timeout=3600):
        cached = _read_reference_cache(cfg, path, key)
        if cached is not None:
            return cached
        log.info("extracting reference features of %d images (cached afterwards in %s)", len(ref), path)
        feats = extract_features(ref.pixels, ex, cfg.eval.batch_size, desc="reference features")
        clean = extract_clean_features(ref.files, ex, cfg.eval.batch_size) if cfg.eval.clean_fid else None
        floor = real_floor(feats, cfg.seed)
        with vio.atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(
                fh,
                feats=feats,
                feats_clean=clean if clean is not None else np.zeros((0, feats.shape[1])),
                floor=np.array(np.nan if floor is None else floor),
            )
    return {"feats": feats, "feats_clean": clean, "floor": floor, "key": key}


def _read_reference_cache(cfg: Config, path: Path, key: str, warn: bool = True) -> dict[str, Any] | None:
    """The cached reference features at `path`, or None when absent or unreadable (then recomputed)."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            out = {k: z[k] for k in z.files}
        cached = {
            "feats": out["feats"],
            "feats_clean": out["feats_clean"] if cfg.eval.clean_fid else None,
            "floor": float(out["floor"]) if out["floor"].size and np.isfinite(out["floor"]) else None,
            "key": key,
        }
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, TypeError) as e:
        reason = " ".join(str(e).split())[:120] or type(e).__name__
        if warn:
            log.warning("%s: unreadable reference cache (%s); recomputing it", path, reason)
        return None
    log.info("reference features from cache %s", path)
    return cached


class TrainingEval:
    """FID and KID of small fixed-seed sample sets while a model trains (`train.eval_every`): the evaluate
    stage's extractor and reference features (the same cache, so the reference is extracted once for
    both), so the curve and metrics.json are measured alike (at `train.eval_images` images the FID is
    biased upwards against the evaluate stage's larger set: compare points of one curve, not across).
    KID subsets are `eval.kid_subset_size` images, or the whole set when it is smaller."""

    def __init__(self, cfg: Config, dataset: str) -> None:
        real, _ = reference_set(cfg, dataset)
        self.cfg = cfg
        self.ex = load_extractor(cfg)
        self.ref = reference_features(cfg, real, self.ex, reference_tag(cfg, dataset))["feats"]
        self.image_shape = tuple(real.pixels.shape[1:])

    def score(self, images: np.ndarray) -> dict[str, float]:
        """{fid, kid_mean, kid_std} of uint8 (N, H, W) images against the reference set."""
        if tuple(images.shape[1:]) != self.image_shape:
            raise UserError(
                f"generated images are {images.shape[2]}x{images.shape[1]} but the reference set's are "
                f"{self.image_shape[1]}x{self.image_shape[0]}; prepare the dataset at data.image_size"
            )
        ev = self.cfg.eval
        feats = extract_features(images, self.ex, ev.batch_size, desc="training-eval features")
        subset = min(ev.kid_subset_size, len(images), len(self.ref))
        kid_mean, kid_std = kernel_distance(self.ref, feats, subset, ev.kid_subsets, self.cfg.seed)
        return {"fid": frechet_distance(self.ref, feats), "kid_mean": kid_mean, "kid_std": kid_std}
