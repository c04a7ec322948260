"""`vmddpm sample`: generate uint8 grayscale PNG samples from a trained model, resumably.

Outputs (default `out` = `cfg.samples_dir(dataset, model)` = `runs/<dataset>/<model>/samples/`):

- `<out>/000000.png`, `000001.png`, ...: `n` images (`sample.n_images`; 0 = as many as the evaluation
  reference set, i.e. manifest rows with split == `eval.reference_split`). Only PNGs of samples live
  in this folder, so the evaluate stage can read every `*.png` in it.
- `<out>_grid.png` beside the folder (`runs/<dataset>/<model>/samples_grid.png`): a grid of the first
  up to 64 images, for eyes and MLflow.
- `<out>_meta.json` beside the folder: how the images were drawn (sampler, steps, eta, seed, EMA,
  checkpoint step); a rerun with different settings refuses to mix images and says what to delete.

Image i is drawn from seed `sample.seed * 1_000_003 + i` alone (per-image generators in
`vmddpm.diffusion`), so a killed run resumes by generating only the missing files, and any image can
be regenerated on its own (the network is always called on exactly `sample.batch_size` rows, see
`Diffusion.sample`, so batch composition never changes a bit). Diffusion presets use EMA weights by
default (`sample.use_ema`) on `train.device`; GAN presets are delegated to `vmddpm.gan.generate`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from vmddpm import cpu_memory
from vmddpm.config import Config
from vmddpm.errors import UserError
from vmddpm.io import write_json, write_png, write_png_grid
from vmddpm.tracking import start_run

log = logging.getLogger(__name__)

SEED_STRIDE = 1_000_003
GRID_MAX = 64


def image_seed(base: int, i: int) -> int:
    """Seed of image i for `sample.seed` = base (distinct bases never share an image seed below 1e6)."""
    return base * SEED_STRIDE + i


def reference_count(cfg: Config, dataset: str) -> int:
    """Size of the evaluation reference set: manifest rows with split == `eval.reference_split`."""
    from vmddpm.data.dataset import split_files

    n = len(split_files(cfg.prepared_dir(dataset), cfg.eval.reference_split))
    if n == 0:
        raise UserError(
            f"{cfg.prepared_dir(dataset) / 'manifest.csv'}: no rows with split == "
            f"{cfg.eval.reference_split} (eval.reference_split); set sample.n_images or another split"
        )
    return n


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 1, H, W) in [-1, 1] -> (N, H, W) uint8."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x[:, 0].numpy()


def write_grid(files: list[Path], path: Path) -> Path:
    return write_png_grid(path, np.stack([np.array(Image.open(f).convert("L")) for f in files]))


def sample(cfg: Config, dataset: str, model: str, out: Path | None = None) -> Path:
    """Write the missing sample PNGs of `model` on `dataset` into `out`; returns `out`."""
    preset = cfg.preset(model)
    cfg.dataset(dataset)
    sc = cfg.sample
    out = Path(out) if out is not None else cfg.samples_dir(dataset, model)
    n = sc.n_images or reference_count(cfg, dataset)
    gan = preset.family == "gan"
    meta_path = out.parent / f"{out.name}_meta.json"
    grid_path = out.parent / f"{out.name}_grid.png"

    if gan:
        generate_fn, step_info, backend = _gan_generator(cfg, dataset, model)
    else:
        generate_fn, step_info, backend = _diffusion_generator(cfg, dataset, model)
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
        "checkpoint_step": step_info,
        "image_size": cfg.data.image_size,
    }
    if meta_path.is_file() and any(f.suffix == ".png" for f in out.glob("*.png")):
        old = json.loads(meta_path.read_text())
        diff = sorted(k for k in meta if old.get(k) != meta[k])
        if diff:
            raise UserError(
                f"{out}: holds samples drawn with other settings ({', '.join(diff)} differ, "
                f"see {meta_path}); "
                f"delete {out} and {meta_path} to draw new samples"
            )

    out.mkdir(parents=True, exist_ok=True)
    write_json(meta_path, meta)
    files = [out / f"{i:06d}.png" for i in range(n)]
    missing = [i for i, f in enumerate(files) if not f.is_file()]
    log.info("sampling %s/%s: %d images, %d missing, into %s", dataset, model, n, len(missing), out)

    with start_run(cfg, "sample", dataset=dataset, model=model, tags={"scan_backend": backend}) as run:
        run.log_params(cfg.flat())
        run.log_params({"n_images": n, "out": str(out), "checkpoint_step": step_info})
        t0 = time.perf_counter()
        bs = sc.batch_size
        with tqdm(
            total=len(missing), desc=f"sample {dataset}/{model}", unit="img", dynamic_ncols=True
        ) as bar:
            for k in range(0, len(missing), bs):
                idx = missing[k : k + bs]
                imgs = generate_fn([image_seed(sc.seed, i) for i in idx])
                for i, arr in zip(idx, to_uint8(imgs), strict=True):
                    write_png(files[i], arr)
                bar.update(len(idx))
                bar.set_postfix(img_s=f"{bar.n / max(time.perf_counter() - t0, 1e-9):.2f}")
        secs = time.perf_counter() - t0
        write_grid(files[: min(n, GRID_MAX)], grid_path)
        run.log_metrics(
            {
                "n_images": n,
                "n_generated": len(missing),
                "seconds": secs,
                "images_per_s": len(missing) / secs if missing and secs > 0 else 0.0,
            }
        )
        run.log_artifact(grid_path)
        run.log_artifact(meta_path)
    return out


def _diffusion_generator(cfg: Config, dataset: str, model: str) -> tuple[Any, int, str]:
    from vmddpm.diffusion import Diffusion
    from vmddpm.train import load_weights, resolve_device, scan_backend_of

    sc = cfg.sample
    net, state = load_weights(cfg, dataset, model, sc.use_ema)
    device = resolve_device(cfg.train.device)
    cpu_memory.configure(cfg.cpu_memory, device.type)
    net = net.to(device)
    backend = scan_backend_of(net, device)
    diffusion = Diffusion(cfg.diffusion)
    size = cfg.data.image_size

    def generate(seeds: list[int]) -> torch.Tensor:
        return diffusion.sample(
            net, (1, size, size), seeds, sc.sampler, sc.steps, sc.eta, device=device, batch_size=sc.batch_size
        )

    return generate, int(state["step"]), backend


def _gan_generator(cfg: Config, dataset: str, model: str) -> tuple[Any, int | None, str]:
    from vmddpm.gan import generate, load_generator

    def gen(seeds: list[int]) -> torch.Tensor:
        return generate(cfg, dataset, model, seeds)

    return gen, load_generator(cfg, dataset, model)[1], "none"
