"""`vmddpm sample`: generate uint8 grayscale PNG samples from a trained model, resumably.

Outputs (default `out` = `cfg.samples_dir(dataset, model)` = `runs/<dataset>/<model>/samples/`):

- `<out>/000000.png`, `000001.png`, ...: `n` images (`sample.n_images`; 0 = as many as the evaluation
  reference set, i.e. manifest rows with split == `eval.reference_split`). Only PNGs of samples live
  in this folder, so the evaluate stage can read every `*.png` in it.
- `<out>_grid.png` beside the folder (`runs/<dataset>/<model>/samples_grid.png`): a grid of the first
  up to 64 images, for eyes and MLflow.
- `<out>_meta.json` beside the folder: how the images were drawn (sampler, steps, eta, seed, EMA,
  checkpoint step, the sha256 of the `model.pt` they came from); a rerun with different settings refuses
  to mix images and says what to delete; new weights (a retrained model) draw every image again.

One process per output: the stage holds `.<out>.lock` beside the folder; a second `vmddpm sample` of
the same folder stops at once, naming the first one's pid.

Image i is drawn from seed `sample.seed * 1_000_003 + i` alone, so a killed run resumes by generating
only the missing files (`vmddpm.generation`). Every family goes through the same code: diffusion presets
use EMA weights by default (`sample.use_ema`), GAN presets their (EMA) generator, on `sample.device`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from vmddpm.config import Config
from vmddpm.contracts import samples_meta_path
from vmddpm.generation import draw, plan
from vmddpm.io import ensure_writable, output_lock
from vmddpm.tracking import start_run, train_run_id

log = logging.getLogger(__name__)


def sample(cfg: Config, dataset: str, model: str, out: Path | None = None) -> Path:
    """Write the missing sample PNGs of `model` on `dataset` into `out`; returns `out`."""
    cfg.preset(model)
    cfg.dataset(dataset)
    out = Path(out) if out is not None else cfg.samples_dir(dataset, model)
    with output_lock(out, "sample"):
        ensure_writable(out, samples_meta_path(out).parent)
        return _sample(cfg, dataset, model, out)


def _sample(cfg: Config, dataset: str, model: str, out: Path) -> Path:
    p = plan(cfg, dataset, model, out)
    n = len(p.files)
    log.info("sampling %s/%s: %d images, %d missing, into %s", dataset, model, n, len(p.missing), out)
    tags = {"scan_backend": p.gen.scan_backend}
    parent = train_run_id(cfg, dataset, model)
    with start_run(cfg, "sample", dataset=dataset, model=model, tags=tags, parent=parent, output=out) as run:
        run.log_params(cfg.flat())
        where = os.path.relpath(out, cfg.root)
        run.log_params(
            {
                "n_images": n,
                "out": where,
                "checkpoint_step": p.gen.checkpoint_step,
                "model_sha256": p.gen.model_sha256,
            }
        )
        secs = draw(p, cfg.sample.seed, cfg.sample.batch_size, desc=f"sample {dataset}/{model}")
        run.log_metrics(
            {
                "n_images": n,
                "n_generated": len(p.missing),
                "seconds": secs,
                "images_per_s": len(p.missing) / secs if p.missing and secs > 0 else 0.0,
            }
        )
        run.log_artifact(p.grid_path)
        run.log_artifact(p.meta_path)
    return out
