"""DDPM training loss and DDPM/DDIM sampling, on diffusers' schedulers.

Why diffusers: its `DDPMScheduler` / `DDIMScheduler` are the reference implementations of the noise
schedule, `add_noise` (q_sample) and the reverse steps; re-deriving them by hand would only add places
for a sign error. This module adds the two things a reproducibility pipeline needs on top:

- the network is an argument (`net(x, t) -> prediction`); nothing here knows its internals;
- per-image seeds: image i's initial noise and every step's noise come only from its own
  `torch.Generator(seed_i)` (on CPU, so the same on any device), so image 7 generated alone equals
  image 7 of a batch, and a resumed sampling job draws exactly the images it would have drawn.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn

from vmddpm.config import DiffusionConfig

log = logging.getLogger(__name__)

SAMPLERS = ("ddpm", "ddim")


class Diffusion:
    """Noise schedule + loss + samplers for one `DiffusionConfig` (T, betas, prediction type)."""

    def __init__(self, cfg: DiffusionConfig) -> None:
        self.cfg = cfg
        self.timesteps = cfg.timesteps
        self.prediction_type = cfg.prediction_type
        self.train_scheduler = self.scheduler("ddpm")

    def scheduler(self, sampler: str) -> DDPMScheduler | DDIMScheduler:
        """A fresh scheduler of kind `sampler` on this schedule (schedulers hold per-run state)."""
        common = dict(
            num_train_timesteps=self.cfg.timesteps,
            beta_start=self.cfg.beta_start,
            beta_end=self.cfg.beta_end,
            beta_schedule=self.cfg.beta_schedule,
            prediction_type=self.cfg.prediction_type,
            clip_sample=True,  # images live in [-1, 1]
            clip_sample_range=1.0,
        )
        if sampler == "ddpm":
            return DDPMScheduler(**common, variance_type="fixed_small")
        if sampler == "ddim":
            return DDIMScheduler(**common, set_alpha_to_one=False, steps_offset=0)
        raise ValueError(f"sampler must be one of {' | '.join(SAMPLERS)}, got {sampler!r}")

    # --------------------------------------------------------------------------------------- train
    def loss(
        self,
        net: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        x0: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Simple DDPM loss: MSE between the network's prediction at a uniform random t and its target.

        `generator` (on x0's device or CPU) makes t and the noise reproducible independently of the
        global RNG, which is what lets a resumed run draw exactly the noise an uninterrupted one did.
        """
        b = x0.shape[0]
        gen_device = generator.device if generator is not None else x0.device
        t = torch.randint(0, self.timesteps, (b,), generator=generator, device=gen_device).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(x0.device)
        sched = self.train_scheduler
        x_t = sched.add_noise(x0, noise, t)
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = sched.get_velocity(x0, noise, t)
        else:
            target = x0
        pred = net(x_t, t)
        return F.mse_loss(pred.float(), target.float())

    # -------------------------------------------------------------------------------------- sample
    @torch.no_grad()
    def sample(
        self,
        net: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        shape: Sequence[int],
        seeds: Sequence[int],
        sampler: str,
        steps: int,
        eta: float = 0.0,
        device: torch.device | str | None = None,
        batch_size: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Generate `len(seeds)` images of `shape` = (C, H, W) in [-1, 1], image i from `seeds[i]` only.

        `eta` is used by DDIM only (0 = deterministic). `progress(k)` is called after each step.

        `batch_size`: the network is always called on exactly this many rows (zero-padded, larger
        inputs chunked). CPU kernels (oneDNN convolutions, GEMM blocking) pick different code paths
        for different batch sizes, which changes the last float bits; a fixed call shape makes image
        i bit-identical whether it is drawn alone or inside any batch. None = len(seeds).
        """
        if steps < 1 or steps > self.timesteps:
            raise ValueError(f"steps must be in 1..{self.timesteps}, got {steps}")
        if device is None:
            device = next(iter(net.parameters())).device if isinstance(net, nn.Module) else "cpu"
        device = torch.device(device)
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        shape = tuple(shape)
        x = torch.cat([torch.randn((1, *shape), generator=g) for g in gens]).to(device)
        sched = self.scheduler(sampler)
        sched.set_timesteps(steps, device=device)
        x = x * sched.init_noise_sigma
        for k, t in enumerate(sched.timesteps):
            t_batch = torch.full((x.shape[0],), int(t), device=device, dtype=torch.long)
            out = _fixed_batch(net, x, t_batch, batch_size or x.shape[0])
            # a list of generators: diffusers' randn_tensor draws image i's noise from gens[i] alone
            if sampler == "ddim":
                x = sched.step(out, t, x, eta=eta, generator=gens).prev_sample
            else:
                x = sched.step(out, t, x, generator=gens).prev_sample
            if progress is not None:
                progress(k)
        return x.clamp(-1, 1)


def _fixed_batch(
    net: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, t: torch.Tensor, size: int
) -> torch.Tensor:
    """`net(x, t)` computed in calls of exactly `size` rows (last chunk zero-padded)."""
    outs = []
    for i in range(0, x.shape[0], size):
        xc, tc = x[i : i + size], t[i : i + size]
        n = xc.shape[0]
        if n < size:
            xc = torch.cat([xc, xc.new_zeros((size - n, *xc.shape[1:]))])
            tc = torch.cat([tc, tc[:1].expand(size - n)])
        outs.append(net(xc, tc)[:n].float())
    return torch.cat(outs)
