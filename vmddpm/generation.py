"""Images from a trained model, written resumably into a folder: the one code path of the sample and
sweep stages (for every family).

- `generator()` loads `model.pt` (`vmddpm.trainkit.load_trained`) and returns a function seeds -> images:
  the diffusion sampler of `sample:` (`vmddpm.diffusion`) or the GAN generator (`vmddpm.adversarial`), on
  `sample.device`.
- `plan()` names the files of a samples folder, writes its meta (`vmddpm.contracts.samples_meta_path`,
  with the sha256 of the `model.pt` the images come from) and refuses to mix images drawn with other
  settings; images drawn from other weights (a retrained model) are stale and drawn again; `draw()`
  writes the missing images.

Image i is drawn from seed `sample.seed * 1_000_003 + i` alone (per-image generators), so a killed run
resumes by generating only the missing files, and any image can be regenerated on its own (the network
is always called on exactly `sample.batch_size` rows, see `Diffusion.sample`, so batch composition never
changes a bit).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from vmddpm import cpu_memory
from vmddpm.config import Config
from vmddpm.contracts import (
    FINAL,
    SEED_STRIDE,
    image_seed,
    samples_grid_path,
    samples_meta_path,
    split_files,
)
from vmddpm.errors import UserError
from vmddpm.io import sha256_file, write_json, write_png, write_png_grid
from vmddpm.runtime import (
    explain_scan_backend,
    is_out_of_memory,
    out_of_memory,
    resolve_device,
    scan_backend_of,
)
from vmddpm.trainkit import load_trained

log = logging.getLogger(__name__)

GRID_MAX = 64


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 1, H, W) in [-1, 1] -> (N, H, W) uint8."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x[:, 0].numpy()


def write_grid(files: list[Path], path: Path) -> Path:
    """The first images of a samples folder as one PNG grid."""
    return write_png_grid(path, np.stack([np.array(Image.open(f).convert("L")) for f in files]))


def reference_count(cfg: Config, dataset: str) -> int:
    """Size of the evaluation reference set: manifest rows with split == `eval.reference_split`."""
    n = len(split_files(cfg.prepared_dir(dataset), cfg.eval.reference_split))
    if n == 0:
        raise UserError(
            f"{cfg.prepared_dir(dataset) / 'manifest.csv'}: no rows with split == "
            f"{cfg.eval.reference_split} (eval.reference_split); set sample.n_images or another split"
        )
    return n


@dataclass
class Generator:
    """seeds -> (N, 1, S, S) images in [-1, 1], and what made them."""

    fn: Callable[[list[int]], torch.Tensor]
    checkpoint_step: int
    scan_backend: str
    device: torch.device
    model_sha256: str = ""


def generator(cfg: Config, dataset: str, model: str) -> Generator:
    """The trained `model` of `dataset` as an image generator, per `cfg.sample` (sampler, steps, eta,
    EMA or raw weights, device)."""
    sc = cfg.sample
    net, state = load_trained(cfg, dataset, model, sc.use_ema)
    digest = sha256_file(cfg.train_dir(dataset, model) / FINAL)
    device = resolve_device(sc.device, "sample.device")
    cpu_memory.configure(cfg.cpu_memory, device.type)
    net = net.to(device)
    step = int(state["step"])
    if cfg.preset(model).family == "gan":
        from vmddpm.adversarial import generator_images

        z_dim = cfg.baselines.gan.z_dim
        return Generator(
            lambda seeds: generator_images(net, z_dim, seeds, device), step, "none", device, digest
        )

    from vmddpm.diffusion import Diffusion

    diffusion = Diffusion(cfg.diffusion)
    size = cfg.data.image_size

    def fn(seeds: list[int]) -> torch.Tensor:
        return diffusion.sample(
            net, (1, size, size), seeds, sc.sampler, sc.steps, sc.eta, device=device, batch_size=sc.batch_size
        )

    log.info("scan backend %s", explain_scan_backend(net, device)[1])
    return Generator(fn, step, scan_backend_of(net, device), device, digest)


@dataclass
class Plan:
    """A samples folder to fill: every file, the missing ones, its meta and grid paths."""

    out: Path
    files: list[Path]
    missing: list[int]
    meta: dict[str, Any]
    meta_path: Path
    grid_path: Path
    gen: Generator


def plan(cfg: Config, dataset: str, model: str, out: Path) -> Plan:
    """Load the generator, check `out` against its meta (never mix settings), write the meta."""
    preset = cfg.preset(model)
    cfg.dataset(dataset)
    sc = cfg.sample
    n = sc.n_images or reference_count(cfg, dataset)
    gan = preset.family == "gan"
    meta_path, grid_path = samples_meta_path(out), samples_grid_path(out)
    gen = generator(cfg, dataset, model)
    meta = {
        "dataset": dataset,
        "model": model,
        "family": preset.family,
        "sampler": "gan" if gan else sc.sampler,
        "steps": None if gan else sc.steps,
        "eta": None if gan or sc.sampler != "ddim" else sc.eta,
        "use_ema": None if gan else sc.use_ema,
        "seed": sc.seed,
        "seed_rule": f"image i uses seed sample.seed * {SEED_STRIDE} + i",
        "checkpoint_step": gen.checkpoint_step,
        "model_sha256": gen.model_sha256,
        "image_size": cfg.data.image_size,
    }
    if any(out.glob("*.png")):
        _check_existing(out, meta, meta_path, grid_path)
    out.mkdir(parents=True, exist_ok=True)
    write_json(meta_path, meta)
    files = [out / f"{i:06d}.png" for i in range(n)]
    missing = [i for i, f in enumerate(files) if not f.is_file()]
    return Plan(out, files, missing, meta, meta_path, grid_path, gen)


def _check_existing(out: Path, meta: dict[str, Any], meta_path: Path, grid_path: Path) -> None:
    """Images already in `out`: kept when drawn exactly like `meta`; deleted (to be drawn again) when
    drawn from other weights (a retrained model); refused when drawn with other sampling settings or of
    unknown origin (no readable meta: never delete PNGs this stage may not have written)."""
    try:
        old = json.loads(meta_path.read_text())
        if not isinstance(old, dict):
            raise ValueError("not a mapping")
    except (OSError, ValueError) as e:
        raise UserError(
            f"{out}: holds PNGs but its meta {meta_path} is missing or unreadable ({type(e).__name__}), so "
            f"how they were drawn is unknown; delete {out} (or pick another --out) to draw new samples"
        ) from None
    if old.get("model_sha256") != meta["model_sha256"]:
        stale = sorted(out.glob("*.png"))
        log.warning(
            "%s: %d images drawn from other weights (model.pt sha256 %s, now %s) are stale; drawing "
            "them again",
            out,
            len(stale),
            str(old.get("model_sha256"))[:12],
            meta["model_sha256"][:12],
        )
        for f in stale:
            f.unlink()
        grid_path.unlink(missing_ok=True)
        return
    diff = sorted(k for k in meta if old.get(k) != meta[k])
    if diff:
        raise UserError(
            f"{out}: holds samples drawn with other settings ({', '.join(diff)} differ, see {meta_path}); "
            f"delete {out} and {meta_path} to draw new samples"
        )


def draw(p: Plan, seed: int, batch_size: int, desc: str) -> float:
    """Write the missing images of `p` (batches of `batch_size`) and the grid; returns the seconds
    spent generating."""
    t0 = time.perf_counter()
    with tqdm(total=len(p.missing), desc=desc, unit="img", dynamic_ncols=True) as bar:
        for k in range(0, len(p.missing), batch_size):
            idx = p.missing[k : k + batch_size]
            try:
                imgs = p.gen.fn([image_seed(seed, i) for i in idx])
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if not is_out_of_memory(e):
                    raise
                knobs = {"sample.batch_size": batch_size}
                raise out_of_memory("sample", p.gen.device, knobs, p.gen.scan_backend) from None
            for i, arr in zip(idx, to_uint8(imgs), strict=True):
                write_png(p.files[i], arr)
            bar.update(len(idx))
            bar.set_postfix(img_s=f"{bar.n / max(time.perf_counter() - t0, 1e-9):.2f}")
    secs = time.perf_counter() - t0
    write_grid(p.files[: min(len(p.files), GRID_MAX)], p.grid_path)
    return secs
