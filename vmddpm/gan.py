"""`vmddpm train` / `vmddpm sample` for the gan family (dcgan, wgan_gp): the GAN training loop.

Why a loop of its own: a GAN alternates discriminator (critic) and generator updates with two
optimisers, which the diffusion loop in `vmddpm.train` does not do. Everything around the loop is
kept identical so that `sample`, `evaluate` and the workflow treat GANs as any other model:

- the same files in `cfg.train_dir(dataset, model)`: `last.pt` (full state: generator, discriminator,
  EMA of the generator, both optimisers, step, global RNG states, the latent/penalty RNG, the data
  sampler position, config, signature, history; atomic, every `train.checkpoint_every` steps and at
  the end), `model.pt` (written once at the end: `model` = generator, `ema` = EMA generator,
  `discriminator`, step, signature) and `history.csv` (step, loss, loss_g, loss_d, lr, images_per_s;
  `loss` is the generator loss so the column means "the objective being minimised" everywhere);
- automatic resume from `last.pt`; re-invoking a finished run (model.pt at >= train.steps) is a no-op;
- one MLflow run (stage=train) with the losses per logged step;
- determinism as in `vmddpm.train`: init from `seed`, latents and gradient-penalty mixing weights from
  one checkpointed `torch.Generator`, data order from `EpochSampler`; a killed and resumed CPU run
  reaches bit-identical weights.

Objectives: `bce` = the non-saturating DCGAN loss (D: BCE(real=1, fake=0); G: BCE(D(G(z)), 1));
`wgan_gp` = WGAN with gradient penalty (Gulrajani et al., 2017): `n_critic` critic steps per generator
step, penalty `gp_weight * (||grad D(x_hat)|| - 1)^2` on random interpolates.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from vmddpm import __version__, cpu_memory
from vmddpm.checkpoint import capture_rng_state, load_checkpoint, save_checkpoint
from vmddpm.config import Config
from vmddpm.errors import UserError
from vmddpm.tracking import start_run
from vmddpm.train import (
    FINAL,
    HISTORY,
    LAST,
    EpochSampler,
    _batch_images,
    already_trained,
    close_run,
    load_dataset,
    resolve_device,
    resume,
    set_determinism,
    update_ema,
    write_history,
)

log = logging.getLogger(__name__)

HISTORY_FIELDS = ("step", "loss", "loss_g", "loss_d", "lr", "images_per_s")


def gradient_penalty(
    disc: nn.Module, real: torch.Tensor, fake: torch.Tensor, gen: torch.Generator
) -> torch.Tensor:
    """WGAN-GP penalty E[(||grad_x D(x_hat)||_2 - 1)^2] on random interpolates of real and fake."""
    alpha = torch.rand(real.shape[0], 1, 1, 1, generator=gen).to(real.device)
    x_hat = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(disc(x_hat).sum(), x_hat, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


def discriminator_loss(
    dnet: nn.Module,
    real: torch.Tensor,
    fake: torch.Tensor,
    wgan: bool,
    gp_weight: float,
    gen: torch.Generator,
) -> torch.Tensor:
    """WGAN-GP critic loss (with the penalty, which draws from `gen`) or the non-saturating DCGAN
    discriminator loss; one definition for training and for `benchmarks/bench_models.py`."""
    d_real, d_fake = dnet(real), dnet(fake)
    if wgan:
        return d_fake.mean() - d_real.mean() + gp_weight * gradient_penalty(dnet, real, fake, gen)
    return F.binary_cross_entropy_with_logits(
        d_real, torch.ones_like(d_real)
    ) + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))


def generator_loss(score: torch.Tensor, wgan: bool) -> torch.Tensor:
    """-E[D(G(z))] for WGAN, the non-saturating BCE for DCGAN, from the discriminator's `score`."""
    return -score.mean() if wgan else F.binary_cross_entropy_with_logits(score, torch.ones_like(score))


def train_gan(cfg: Config, dataset: str, model: str) -> Path:
    """Train gan preset `model` on `dataset` (resuming from `last.pt`); returns the train folder."""
    from vmddpm.nn.registry import build_gan, model_signature

    preset = cfg.preset(model)
    out = cfg.train_dir(dataset, model)
    signature = model_signature(cfg, model)
    final = out / FINAL
    if already_trained(final, signature, cfg.train.steps):
        return out

    tc, gc = cfg.train, cfg.baselines.gan
    device = resolve_device(tc.device)
    set_determinism(tc.deterministic)
    data = load_dataset(cfg, dataset)
    cpu_memory.configure(cfg.cpu_memory, device.type)  # once the inputs are known good
    torch.manual_seed(cfg.seed)
    gnet, dnet = build_gan(cfg, model)
    gnet, dnet = gnet.to(device), dnet.to(device)
    ema = AveragedModel(gnet, multi_avg_fn=get_ema_multi_avg_fn(tc.ema_decay), use_buffers=True)
    betas = (gc.betas[0], gc.betas[1])
    opt_g = torch.optim.Adam(gnet.parameters(), lr=gc.lr, betas=betas)
    opt_d = torch.optim.Adam(dnet.parameters(), lr=gc.lr, betas=betas)
    noise_gen = torch.Generator("cpu").manual_seed(cfg.seed * 1009 + 17)
    wgan = preset.gan_loss == "wgan_gp"
    n_critic = gc.n_critic if wgan else 1

    last = out / LAST
    parts = {"model": gnet, "discriminator": dnet, "ema": ema, "optimizer": opt_g, "optimizer_d": opt_d}
    step, history, state = resume(last, signature, parts, noise_gen)
    if state is not None:
        log.info("resuming %s from step %d", last, step)

    per_step = tc.batch_size * n_critic  # every critic step draws a fresh real batch
    sampler = EpochSampler(len(data), cfg.seed, start=step * per_step)
    loader = DataLoader(
        data,
        batch_size=tc.batch_size,
        sampler=sampler,
        num_workers=tc.num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed),
    )

    def full_state() -> dict[str, Any]:
        return {
            "model": gnet.state_dict(),
            "discriminator": dnet.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": opt_g.state_dict(),
            "optimizer_d": opt_d.state_dict(),
            "step": step,
            "rng": capture_rng_state(),
            "noise_rng": [noise_gen.get_state()],
            "sampler": {**sampler.state(step * per_step), "world": 1},
            "config": cfg.to_dict(),
            "signature": signature,
            "version": __version__,
            "scan_backend": "none",
            "history": history,
        }

    def checkpoint() -> None:
        save_checkpoint(last, full_state())
        write_history(out / HISTORY, history, HISTORY_FIELDS)

    def finish() -> Path:
        checkpoint()
        save_checkpoint(
            final,
            {
                "model": gnet.state_dict(),
                "ema": ema.module.state_dict(),
                "discriminator": dnet.state_dict(),
                "step": step,
                "signature": signature,
                "config": cfg.to_dict(),
                "version": __version__,
                "scan_backend": "none",
            },
        )
        log.info("trained to step %d: %s", step, final)
        return final

    if step >= tc.steps:
        finish()
        return out

    with start_run(cfg, "train", dataset=dataset, model=model, tags={"scan_backend": "none"}) as run:
        run.log_params(cfg.flat())
        run.log_params({"device": str(device), "resumed_from_step": step})
        log.info(
            "training %s (%s) on %s: %d steps, device %s", model, preset.gan_loss, dataset, tc.steps, device
        )
        batches = iter(loader)
        bar = tqdm(total=tc.steps, initial=step, desc=f"train {dataset}/{model}", dynamic_ncols=True)
        t_last, n_since = time.perf_counter(), 0
        gnet.train()
        dnet.train()
        while step < tc.steps:
            for _ in range(n_critic):
                real = _batch_images(next(batches)).to(device).float()
                if cfg.data.hflip:
                    flip = torch.rand(real.shape[0], generator=noise_gen) < 0.5
                    real = torch.where(flip.to(device)[:, None, None, None], real.flip(-1), real)
                z = torch.randn(real.shape[0], gc.z_dim, generator=noise_gen).to(device)
                with torch.no_grad():
                    fake = gnet(z)
                loss_d = discriminator_loss(dnet, real, fake, wgan, gc.gp_weight, noise_gen)
                opt_d.zero_grad(set_to_none=True)
                loss_d.backward()
                opt_d.step()
                n_since += real.shape[0]
            z = torch.randn(tc.batch_size, gc.z_dim, generator=noise_gen).to(device)
            loss_g = generator_loss(dnet(gnet(z)), wgan)
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            step += 1
            update_ema(ema, gnet, step, tc.ema_warmup_steps)
            lg, ld = float(loss_g.detach()), float(loss_d.detach())
            if not (math.isfinite(lg) and math.isfinite(ld)):
                raise UserError(
                    f"{out}: GAN loss is not finite at step {step} (G {lg}, D {ld}); lower "
                    "baselines.gan.lr in params.yaml, then rerun to resume from the last checkpoint"
                )
            bar.update(1)
            if step % tc.log_every == 0 or step == tc.steps:
                now = time.perf_counter()
                ips = n_since / max(now - t_last, 1e-9)
                t_last, n_since = now, 0
                row = {"step": step, "loss": lg, "loss_g": lg, "loss_d": ld, "lr": gc.lr, "images_per_s": ips}
                history.append(row)
                bar.set_postfix(g=f"{lg:.3f}", d=f"{ld:.3f}")
                metrics = {k: v for k, v in row.items() if k != "step"}
                run.log_metrics({**metrics, "peak_rss_mb": cpu_memory.peak_rss_mb()}, step=step)
            if step % tc.checkpoint_every == 0 and step < tc.steps:
                checkpoint()
        bar.close()
        path = finish()
        close_run(run, out, path)
    return out


_CACHE: dict[tuple[str, int, bool], tuple[nn.Module, int]] = {}


def load_generator(cfg: Config, dataset: str, model: str) -> tuple[nn.Module, int]:
    """The trained generator of `model.pt` (EMA weights if `sample.use_ema`), eval mode on CPU, and its step.

    Cached per file version: `sample` calls `generate` once per batch.
    """
    from vmddpm.nn.registry import build_gan, model_signature

    path = cfg.train_dir(dataset, model) / FINAL
    if not path.is_file():
        raise UserError(
            f"{path}: no trained model; run `vmddpm train --dataset {dataset} --model {model}` first"
        )
    key = (str(path), path.stat().st_mtime_ns, cfg.sample.use_ema)
    if key not in _CACHE:
        state = load_checkpoint(path, expect=model_signature(cfg, model))
        gnet, _ = build_gan(cfg, model)
        gnet.load_state_dict(state["ema" if cfg.sample.use_ema else "model"])
        _CACHE.clear()
        _CACHE[key] = (gnet.eval(), int(state["step"]))
    return _CACHE[key]


@torch.no_grad()
def generate(cfg: Config, dataset: str, model: str, seeds: list[int]) -> torch.Tensor:
    """(len(seeds), 1, S, S) images in [-1, 1]; image i's latent comes from `seeds[i]` alone.

    The generator runs in eval mode (BatchNorm uses its running statistics), so an image does not
    depend on the other images of its batch.
    """
    gnet, _ = load_generator(cfg, dataset, model)
    z_dim = cfg.baselines.gan.z_dim
    z = torch.stack([torch.randn(z_dim, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    return gnet(z).clamp(-1, 1)
