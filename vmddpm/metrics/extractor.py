"""The feature network of the evaluation: torch-fidelity's Inception-v3 or its fixed-seed random twin.

The real weights (`pt_inception-2015-12-05`) are never downloaded here: they come from torch-fidelity's
cache or a configured path, are checked against the published sha256, and their absence is a one-line
error saying where to get the file. The random twin (the demo's `eval.extractor: random-inception`) has
torch-fidelity's architecture and a fixed-seed He-normal init; torch-fidelity's constructor always loads a
state dict, so the twin is registered with torch-fidelity's extractor registry (the workaround below) and
`torch_fidelity.calculate_metrics(feature_extractor=RANDOM_EXTRACTOR_NAME, ...)` uses it too.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vmddpm.errors import UserError
from vmddpm.io import sha256_file
from vmddpm.runtime import state_hash

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


def torch_hub_checkpoints() -> Path:
    """torch-fidelity's weight cache (torch hub's checkpoints folder; $TORCH_HOME moves it)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def inception_weights_path(configured: Path | None, params: Path) -> Path:
    """Where the real Inception weights are: `configured` (`eval.inception_weights`, resolved by the
    caller), else torch-fidelity's cache. Checked against the published sha256.

    Raises a UserError that says where to download the file and where to put it (`params` is the
    params.yaml to name).
    """
    how = (
        f"download {INCEPTION_URL} (sha256 {INCEPTION_SHA256}) and either put it at "
        f"{torch_hub_checkpoints() / INCEPTION_FILENAME} (torch-fidelity's cache; $TORCH_HOME moves it) "
        f"or set eval.inception_weights in {params} to its path; "
        "eval.extractor=random-inception runs without it but its numbers are demo-only"
    )
    if configured is not None:
        path = configured
        if not path.is_file():
            raise UserError(f"{path}: eval.inception_weights names no file; {how}")
    else:
        found = [torch_hub_checkpoints() / n for n in INCEPTION_ALIASES]
        found = [p for p in found if p.is_file()]
        if not found:
            raise UserError(f"{torch_hub_checkpoints()}: no Inception-v3 FID weights found; {how}")
        path = found[0]
    digest = sha256_file(path)
    if digest != INCEPTION_SHA256:
        raise UserError(
            f"{path}: sha256 {digest} is not the pt_inception-2015-12-05 weights ({INCEPTION_SHA256}); "
            f"the file is corrupt or a different network: {how}"
        )
    return path


def load_extractor(kind: str, device: torch.device, *, seed: int, weights: Path | None = None) -> Extractor:
    """`kind` = "inception" (the real weights at `weights`, sha256-checked by `inception_weights_path`)
    or "random-inception" (the fixed-seed random network, `seed`), in eval mode on `device`."""
    if kind == "random-inception":
        cls = random_inception_cls(seed)
        module = cls(RANDOM_EXTRACTOR_NAME, [FEATURE_LAYER])
        sha, path = state_hash(module.state_dict(), dtypes=False), None
    else:
        if weights is None:
            raise ValueError("the inception extractor needs its weights path")
        module = _tf_inception_cls()(
            "inception-v3-compat", [FEATURE_LAYER], feature_extractor_weights_path=str(weights)
        )
        sha, path = INCEPTION_SHA256, weights
    # channels_last: ~1.3-2x faster Inception on CPU, same features to ~1e-6
    module = module.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)
    log.info("feature extractor: %s (weights sha256 %s) on %s", kind, sha[:12], device)
    return Extractor(kind, module, sha, path, device)


def resize_protocol(ex: Extractor) -> str:
    """What metrics.json records as `resize`: the extractor's own input size (299, or the random
    extractor's smaller one)."""
    return RESIZE.format(size=getattr(ex.module, "INPUT_IMAGE_SIZE", 299))
