"""GAN objectives (the dcgan and wgan_gp baselines): losses of a generator and a discriminator.

Like `vmddpm.diffusion`, this takes networks and tensors and knows nothing of files or configs; the
training loop is the gan stage (`vmddpm.stages.gan`) and `benchmarks/bench_models.py` times the same
losses.

`bce` = the non-saturating DCGAN loss (D: BCE(real=1, fake=0); G: BCE(D(G(z)), 1)); `wgan_gp` = WGAN
with gradient penalty (Gulrajani et al., 2017): penalty `gp_weight * (||grad D(x_hat)|| - 1)^2` on random
interpolates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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


@torch.no_grad()
def generator_images(gnet: nn.Module, z_dim: int, seeds: list[int], device: torch.device) -> torch.Tensor:
    """(len(seeds), 1, S, S) images in [-1, 1]; image i's latent comes from `seeds[i]` alone.

    The generator must be in eval mode (BatchNorm on its running statistics), so an image does not
    depend on the other images of its batch.
    """
    z = torch.stack([torch.randn(z_dim, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    return gnet(z.to(device)).clamp(-1, 1)
