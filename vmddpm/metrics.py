"""The `evaluate` stage: FID/KID with a recorded protocol, a clean-fid cross-check, the real-vs-real
floor and a memorisation check, written to `metrics.json` (DESIGN.md §6).

Why it is built this way:

* **One feature pass per image set.** Features come from torch-fidelity's own Inception-v3 module
  (`FeatureExtractorInceptionV3`, 2048-d pool features, its TF1-exact bilinear resize to 299): the very
  network and preprocessing `torch_fidelity.calculate_metrics` uses (a test checks that both give the
  same FID on the same folders). Computing the features here, not inside `calculate_metrics`, lets the
  reference set's features be computed once per dataset and cached (11 models x 3 datasets share them),
  and lets the floor, KID and FID reuse one pass.
* **FID/KID from torch-fidelity's functions** (`fid_features_to_statistics`, `fid_statistics_to_metric`,
  `kid_features_to_metric`). When a set has fewer images than feature dimensions (every demo run) the
  Fréchet trace term is computed exactly in the n-dimensional sample space instead of by a 2048 x 2048
  eigen-decomposition (same number, ~100x faster; tests compare it against both libraries).
* **clean-fid cross-check**: the same Inception weights fed through clean-fid's own file reading and
  anti-aliased PIL-bicubic resize (`cleanfid.fid.get_files_features`, mode "clean"). A large gap between
  `fid` and `fid_clean` means the number depends on resizing, which a reader should know.
* **Inception weights are never downloaded here**: they come from torch-fidelity's cache or
  `eval.inception_weights`, are checked against the published sha256, and their absence is a one-line
  error saying where to get the file. `eval.extractor: random-inception` (a fixed-seed random network)
  exists for the demo and tests; its numbers are labelled and never compared with the paper.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from vmddpm import cpu_memory
from vmddpm import io as vio
from vmddpm.config import DEMO_LABEL, Config
from vmddpm.errors import UserError

log = logging.getLogger(__name__)

# torch-fidelity's converted TF Inception (pt_inception-2015-12-05); the name carries the sha256 prefix.
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
INCEPTION_FILENAME = INCEPTION_URL.rsplit("/", 1)[-1]
# pytorch-fid publishes the same file as pt_inception-2015-12-05-6726825d.pth.
INCEPTION_ALIASES = (INCEPTION_FILENAME, "pt_inception-2015-12-05-6726825d.pth")
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
FEATURE_LAYER = "2048"
RANDOM_EXTRACTOR_NAME = "vmddpm-random-inception-v3"
RESIZE = "torch-fidelity tf1-bilinear to {size}x{size}, grayscale replicated to 3 channels"
RANDOM_INPUT_SIZE = 75
"""Input side of the random extractor: Inception-v3's smallest (16x fewer FLOPs than 299). Its
weights are random and its numbers demo-only, so only the plumbing matters; at 299 the demo's 33
evaluate jobs spent more CPU on Inception than the training of the models they evaluate."""
RESIZE_CLEAN = "clean-fid PIL-bicubic (anti-aliased) to 299x299"
PROTOCOL_VERSION = 2  # bump when feature extraction changes: invalidates the reference-feature caches
IMAGE_SUFFIXES = (".png",)

# Fields every metrics.json carries (DESIGN.md §6 plus identification and the memorisation check).
PROTOCOL_FIELDS = (
    "dataset",
    "model",
    "fid",
    "kid_mean",
    "kid_std",
    "fid_clean",
    "fid_real_floor",
    "n_real",
    "n_fake",
    "extractor",
    "weights_sha256",
    "resize",
    "sampler",
    "steps",
    "seed",
    "scale",
    "comparable_to_paper",
    "label",
    "memorised_share",
    "memorised_count",
    "nn_distance_min",
    "nn_distance_median",
    "memorisation_threshold",
)


# ------------------------------------------------------------------------------------- extractors
def _random_init_(module: torch.nn.Module, seed: int) -> None:
    """Deterministic He-normal init: keeps activations O(1) through Inception's depth (PyTorch's default
    conv init shrinks them layer by layer, which would make every demo FID ~1e-6)."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=gen)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
        elif isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=m.in_features**-0.5, generator=gen)
            torch.nn.init.zeros_(m.bias)
        elif isinstance(m, torch.nn.BatchNorm2d):
            m.reset_parameters()


def _tf_inception_cls() -> type:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3


def _make_random_cls() -> type:
    """torch-fidelity's Inception-v3 architecture with a fixed-seed random init (demo and tests only).

    torch-fidelity's constructor always loads a state dict; an empty one (from an in-memory file)
    is the signal to initialise randomly instead. Registered with torch-fidelity so that
    `torch_fidelity.calculate_metrics(feature_extractor=RANDOM_EXTRACTOR_NAME, ...)` uses it too.
    """
    base = _tf_inception_cls()

    class RandomInceptionV3(base):  # type: ignore[misc, valid-type]
        seed = 0
        INPUT_IMAGE_SIZE = RANDOM_INPUT_SIZE

        def __init__(self, name: str, features_list: Sequence[str], **kwargs: Any) -> None:
            kwargs.pop("feature_extractor_weights_path", None)
            buf = io.BytesIO()
            torch.save({}, buf)
            buf.seek(0)
            super().__init__(name, list(features_list), feature_extractor_weights_path=buf, **kwargs)

        def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
            if state_dict:
                return super().load_state_dict(state_dict, strict, assign)
            _random_init_(self, type(self).seed)
            return None

    return RandomInceptionV3


_RANDOM_CLS: type | None = None


def random_inception_cls(seed: int) -> type:
    """The registered random extractor class, seeded with `seed` (the project's `seed:`)."""
    global _RANDOM_CLS
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if _RANDOM_CLS is None:
        _RANDOM_CLS = FEATURE_EXTRACTORS_REGISTRY.get(RANDOM_EXTRACTOR_NAME) or _make_random_cls()
        if RANDOM_EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
            register_feature_extractor(RANDOM_EXTRACTOR_NAME, _RANDOM_CLS)
    _RANDOM_CLS.seed = seed
    return _RANDOM_CLS


@dataclass
class Extractor:
    """A loaded feature network and the facts metrics.json records about it."""

    kind: str  # inception | random-inception
    module: torch.nn.Module
    weights_sha256: str
    weights_path: Path | None
    device: torch.device


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _torch_hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def inception_weights_path(cfg: Config) -> Path:
    """Where the real Inception weights are: `eval.inception_weights`, else torch-fidelity's cache.

    Raises a UserError that says where to download the file and where to put it.
    """
    how = (
        f"download {INCEPTION_URL} (sha256 {INCEPTION_SHA256}) and either put it at "
        f"{_torch_hub_checkpoints() / INCEPTION_FILENAME} (torch-fidelity's cache; $TORCH_HOME moves it) "
        f"or set eval.inception_weights in {cfg.source} to its path; "
        "eval.extractor=random-inception runs without it but its numbers are demo-only"
    )
    if cfg.eval.inception_weights:
        path = Path(cfg.eval.inception_weights).expanduser()
        if not path.is_absolute():
            path = cfg.root / path
        if not path.is_file():
            raise UserError(f"{path}: eval.inception_weights names no file; {how}")
    else:
        found = [_torch_hub_checkpoints() / n for n in INCEPTION_ALIASES]
        found = [p for p in found if p.is_file()]
        if not found:
            raise UserError(f"{_torch_hub_checkpoints()}: no Inception-v3 FID weights found; {how}")
        path = found[0]
    digest = sha256_file(path)
    if digest != INCEPTION_SHA256:
        raise UserError(
            f"{path}: sha256 {digest} is not the pt_inception-2015-12-05 weights ({INCEPTION_SHA256}); "
            f"the file is corrupt or a different network: {how}"
        )
    return path


def _device(cfg: Config) -> torch.device:
    want = cfg.eval.device
    if want == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{cfg.source}: eval.device=cuda but no CUDA device is visible; set eval.device=auto")
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(want)


def _state_sha256(module: torch.nn.Module) -> str:
    """A content hash of a network's parameters and buffers (for the random extractor's record)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def load_extractor(cfg: Config) -> Extractor:
    """The configured Inception: real weights (sha256-checked) or the fixed-seed random network."""
    device = _device(cfg)
    if cfg.eval.extractor == "random-inception":
        cls = random_inception_cls(cfg.seed)
        module = cls(RANDOM_EXTRACTOR_NAME, [FEATURE_LAYER])
        sha, path = _state_sha256(module), None
    else:
        path = inception_weights_path(cfg)
        module = _tf_inception_cls()(
            "inception-v3-compat", [FEATURE_LAYER], feature_extractor_weights_path=str(path)
        )
        sha = INCEPTION_SHA256
    # channels_last: ~1.3-2x faster Inception on CPU, same features to ~1e-6
    module = module.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)
    log.info("feature extractor: %s (weights sha256 %s) on %s", cfg.eval.extractor, sha[:12], device)
    cpu_memory.configure(cfg.cpu_memory, device.type)
    return Extractor(cfg.eval.extractor, module, sha, path, device)


def resize_protocol(ex: Extractor) -> str:
    """What metrics.json records as `resize`: the extractor's own input size (299, or the random
    extractor's smaller one)."""
    return RESIZE.format(size=getattr(ex.module, "INPUT_IMAGE_SIZE", 299))


# ------------------------------------------------------------------------------------------ images
@dataclass
class ImageSet:
    """A validated set of uint8 grayscale images (N x H x W) and the digest of their bytes."""

    folder: Path
    files: list[Path]
    pixels: np.ndarray
    digest: str

    def __len__(self) -> int:
        return len(self.files)


def list_images(folder: Path) -> list[Path]:
    """The PNGs of `folder`, sorted; anything else (but hidden files) is an error naming it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(
            f"{folder}: no such folder of images; run the stage that writes it or pass another path"
        )
    files, other = [], []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):  # atomic-write temp files, .DS_Store
            continue
        (files if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES else other).append(p)
    if other:
        names = ", ".join(p.name for p in other[:3]) + (" ..." if len(other) > 3 else "")
        raise UserError(
            f"{folder}: {len(other)} entries are not PNG images ({names}); "
            "the folder must hold only the uint8 grayscale PNGs to evaluate: move the others out"
        )
    if not files:
        raise UserError(
            f"{folder}: contains no PNG images; run the stage that writes them or pass another folder"
        )
    return files


def load_images(files: Sequence[Path], folder: Path, what: str) -> ImageSet:
    """Decode `files` as 8-bit grayscale images of one size; every problem is a UserError naming it."""
    folder = Path(folder)
    if not files:
        raise UserError(f"{folder}: no {what} images; run the stage that writes them or pass another folder")
    arrays, h = [], hashlib.sha256()
    size: tuple[int, int] | None = None
    for f in tqdm(files, desc=f"read {what}", unit="img", disable=len(files) < 500, leave=False):
        try:
            data = Path(f).read_bytes()
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                mode, im_size = im.mode, im.size
                arr = np.asarray(im)
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(
                f"{folder}: {Path(f).name} is not a readable image ({e}); remove or replace it"
            ) from None
        if mode != "L":
            raise UserError(
                f"{folder}: {Path(f).name} has mode {mode}; the protocol needs 8-bit grayscale (mode L) PNGs"
            )
        if size is None:
            size = im_size
        elif im_size != size:
            raise UserError(
                f"{folder}: mixed image sizes ({Path(f).name} is {im_size[0]}x{im_size[1]}, "
                f"{Path(files[0]).name} is {size[0]}x{size[1]}); all images must have one size"
            )
        h.update(Path(f).name.encode())
        h.update(hashlib.sha256(data).digest())
        arrays.append(arr)
    return ImageSet(folder, list(files), np.stack(arrays), h.hexdigest())


def load_folder(folder: Path, what: str, limit: int = 0) -> ImageSet:
    files = list_images(folder)
    if limit:
        if len(files) < limit:
            raise UserError(
                f"{folder}: holds {len(files)} images but eval.n_fake asks for {limit}; "
                "generate more (sample.n_images) or lower eval.n_fake"
            )
        files = files[:limit]
    return load_images(files, folder, what)


# ---------------------------------------------------------------------------------------- features
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


# ----------------------------------------------------------------------------------------- metrics
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


# --------------------------------------------------------------------------------- reference cache
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
    cached = _read_reference_cache(cfg, path, key)
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


def _read_reference_cache(cfg: Config, path: Path, key: str) -> dict[str, Any] | None:
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
    except (OSError, ValueError, KeyError) as e:
        log.warning("%s: unreadable reference cache (%s); recomputing", path, e)
        return None
    log.info("reference features from cache %s", path)
    return cached


# ------------------------------------------------------------------------------------------- stage
def _check_kid_size(cfg: Config, sets: Sequence[ImageSet]) -> None:
    for s in sets:
        if len(s) < cfg.eval.kid_subset_size:
            raise UserError(
                f"{s.folder}: {len(s)} images, fewer than eval.kid_subset_size={cfg.eval.kid_subset_size} "
                f"(KID draws subsets of that size); lower eval.kid_subset_size in {cfg.source} "
                "or provide more images"
            )


def _sampler_fields(cfg: Config, model: str, samples: Path) -> dict[str, Any]:
    """How the samples were drawn: the sample stage's `<samples>_meta.json` when present (it records
    what was actually run, including the checkpoint step), else what the config says."""
    meta_path = samples.parent / f"{samples.name}_meta.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            return {
                "sampler": meta.get("sampler"),
                "steps": meta.get("steps"),
                "seed": meta.get("seed"),
                "eta": meta.get("eta"),
                "checkpoint_step": meta.get("checkpoint_step"),
                "samples_meta": str(meta_path),
            }
        except (OSError, ValueError) as e:
            log.warning("%s: unreadable (%s); recording the sampler from the config instead", meta_path, e)
    if cfg.preset(model).family == "gan":
        return {"sampler": "gan", "steps": None, "seed": cfg.sample.seed, "checkpoint_step": None}
    return {
        "sampler": cfg.sample.sampler,
        "steps": cfg.sample.steps,
        "seed": cfg.sample.seed,
        "eta": cfg.sample.eta if cfg.sample.sampler == "ddim" else None,
        "checkpoint_step": None,
    }


def compute_metrics(
    cfg: Config,
    real: ImageSet,
    fake: ImageSet,
    train: ImageSet | None,
    ex: Extractor,
    cache_tag: str,
) -> dict[str, Any]:
    """Every number of metrics.json for one generated set against one reference set."""
    _check_kid_size(cfg, (real, fake))
    if real.pixels.shape[1:] != fake.pixels.shape[1:]:
        raise UserError(
            f"{fake.folder}: images are {fake.pixels.shape[2]}x{fake.pixels.shape[1]} but the reference "
            f"{real.folder} has {real.pixels.shape[2]}x{real.pixels.shape[1]}; sample at data.image_size"
        )
    ref = reference_features(cfg, real, ex, cache_tag)
    feats = extract_features(fake.pixels, ex, cfg.eval.batch_size, desc="generated features")
    kid_mean, kid_std = kernel_distance(
        ref["feats"], feats, cfg.eval.kid_subset_size, cfg.eval.kid_subsets, cfg.seed
    )
    fid_clean = None
    if cfg.eval.clean_fid:
        fid_clean = frechet_distance(
            ref["feats_clean"], extract_clean_features(fake.files, ex, cfg.eval.batch_size)
        )
    comparable = cfg.scale == "paper" and ex.kind == "inception"
    out: dict[str, Any] = {
        "fid": frechet_distance(ref["feats"], feats),
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "fid_clean": fid_clean,
        "fid_real_floor": ref["floor"],
        "n_real": len(real),
        "n_fake": len(fake),
        "extractor": ex.kind,
        "weights_sha256": ex.weights_sha256,
        "feature_layer": f"pool3 {FEATURE_LAYER}-d",
        "resize": resize_protocol(ex),
        "resize_clean": RESIZE_CLEAN if cfg.eval.clean_fid else None,
        "image_size": int(fake.pixels.shape[1]),
        "kid_subset_size": cfg.eval.kid_subset_size,
        "kid_subsets": cfg.eval.kid_subsets,
        "scale": cfg.scale,
        "comparable_to_paper": comparable,
        "label": "" if comparable else DEMO_LABEL,
        "reference_key": ref["key"],
        "protocol_version": PROTOCOL_VERSION,
        "versions": _versions(),
    }
    if train is not None:
        out.update(
            memorisation(
                fake.pixels, train.pixels, cfg.eval.memorisation_threshold, cfg.data.hflip, ex.device
            )
        )
        if out["memorised_count"]:
            log.warning(
                "%s: %d of %d generated images are within %.3g of a training image (possible memorisation)",
                fake.folder,
                out["memorised_count"],
                len(fake),
                cfg.eval.memorisation_threshold,
            )
    return out


def _versions() -> dict[str, str]:
    import cleanfid
    import torch_fidelity

    return {
        "torch": torch.__version__,
        "torch_fidelity": torch_fidelity.__version__,
        "clean_fid": getattr(cleanfid, "__version__", "unknown"),
    }


def _split_files(cfg: Config, dataset: str, split: str) -> tuple[Path, list[Path]]:
    from vmddpm.data.dataset import split_files

    prepared = cfg.prepared_dir(dataset)
    if not (prepared / "manifest.csv").is_file():
        raise UserError(
            f"{prepared}: no prepared dataset (manifest.csv missing); "
            f"run `vmddpm prepare --dataset {dataset}`"
        )
    return prepared, list(split_files(prepared, split))


def evaluate(
    cfg: Config,
    dataset: str,
    model: str,
    samples: Path | None = None,
    out: Path | None = None,
    ddim_sweep: bool = False,
) -> Path:
    """`vmddpm evaluate`: metrics.json for `model`'s samples on `dataset` (and an MLflow run)."""
    cfg.dataset(dataset)
    cfg.preset(model)
    samples = Path(samples) if samples is not None else cfg.samples_dir(dataset, model)
    out = Path(out) if out is not None else cfg.metrics_path(dataset, model)
    list_images(samples)  # a bad samples folder fails fast, before the reference set is read
    prepared, ref_files = _split_files(cfg, dataset, cfg.eval.reference_split)
    real = load_images(ref_files, prepared, f"{cfg.eval.reference_split} split")
    if cfg.eval.reference_split == "train":
        train = real
    else:
        train = load_images(_split_files(cfg, dataset, "train")[1], prepared, "train split")
    n_fake = cfg.eval.n_fake or len(real)
    fake = load_folder(samples, "generated", limit=n_fake)
    ex = load_extractor(cfg)
    metrics = {
        "dataset": dataset,
        "model": model,
        **_sampler_fields(cfg, model, samples),
        "reference_split": cfg.eval.reference_split,
        "samples_dir": str(samples),
        **compute_metrics(cfg, real, fake, train, ex, cache_tag=f"{dataset}-{cfg.eval.reference_split}"),
    }
    if ddim_sweep:
        metrics["ddim_sweep"] = str(run_ddim_sweep(cfg, dataset, model, real, ex))
    vio.write_json(out, metrics)
    log.info(
        "%s/%s: FID %.4g (clean-fid %s, real floor %s), KID %.4g ± %.2g, memorised %.1f%% -> %s",
        dataset,
        model,
        metrics["fid"],
        _fmt(metrics["fid_clean"]),
        _fmt(metrics["fid_real_floor"]),
        metrics["kid_mean"],
        metrics["kid_std"],
        100 * metrics.get("memorised_share", 0.0),
        out,
    )
    _track(cfg, dataset, model, metrics, out)
    return out


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def _track(cfg: Config, dataset: str, model: str, metrics: dict[str, Any], out: Path) -> None:
    """One MLflow run per evaluate invocation (vmddpm.tracking owns the store, tags and retries).

    Metrics are logged at step = the checkpoint's training step (else train.steps) so that evaluations
    of runs trained for different lengths
    (e.g. `dvc exp run -S train.steps=...`) make an FID-against-training-step curve in the report.
    """
    try:
        from vmddpm.tracking import start_run
    except ImportError:
        log.warning("vmddpm.tracking is not available: evaluate run not logged to MLflow")
        return
    numeric = {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None
    }
    params = {
        k: str(metrics[k])
        for k in ("extractor", "weights_sha256", "resize", "sampler", "steps", "seed", "reference_split")
        if k in metrics
    }
    with start_run(
        cfg, "evaluate", dataset=dataset, model=model, tags={"label": metrics["label"] or "paper-protocol"}
    ) as run:
        run.log_params({f"eval_protocol.{k}": v for k, v in params.items()})
        step = metrics.get("checkpoint_step")
        run.log_metrics(numeric, step=step if isinstance(step, int) else cfg.train.steps)
        run.log_artifact(out)


# ---------------------------------------------------------------------------------------- DDIM sweep
def ddim_sweep_path(cfg: Config, dataset: str, model: str) -> Path:
    return cfg.run_dir(dataset, model) / "ddim_sweep.json"


def run_ddim_sweep(cfg: Config, dataset: str, model: str, real: ImageSet, ex: Extractor) -> Path:
    """FID against the number of DDIM steps (`eval.ddim_steps_sweep`): samples each step count with the
    sample stage's own code into runs/<ds>/<model>/ddim_sweep/steps_<k>/, evaluates it, and writes
    ddim_sweep.json. Optional (`vmddpm evaluate --ddim-sweep`): it costs one sampling run per entry."""
    if cfg.preset(model).family == "gan":
        raise UserError(
            f"{cfg.source}: presets.{model} is a GAN; a DDIM-steps sweep applies to diffusion models only"
        )
    from vmddpm.sample import sample

    rows = []
    for k in cfg.eval.ddim_steps_sweep:
        sub = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, sampler="ddim", steps=k))
        folder = cfg.run_dir(dataset, model) / "ddim_sweep" / f"steps_{k}"
        sample(sub, dataset=dataset, model=model, out=folder)
        fake = load_folder(folder, f"generated (DDIM {k} steps)", limit=cfg.eval.n_fake or len(real))
        _check_kid_size(cfg, (fake,))
        ref = reference_features(cfg, real, ex, f"{dataset}-{cfg.eval.reference_split}")
        feats = extract_features(fake.pixels, ex, cfg.eval.batch_size, desc=f"DDIM {k} features")
        rows.append({"steps": k, "fid": frechet_distance(ref["feats"], feats), "n_fake": len(fake)})
    path = ddim_sweep_path(cfg, dataset, model)
    comparable = cfg.scale == "paper" and ex.kind == "inception"
    vio.write_json(
        path,
        {
            "dataset": dataset,
            "model": model,
            "sampler": "ddim",
            "eta": cfg.sample.eta,
            "extractor": ex.kind,
            "scale": cfg.scale,
            "label": "" if comparable else DEMO_LABEL,
            "rows": rows,
        },
    )
    return path
