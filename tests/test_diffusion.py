"""vmddpm.diffusion: loss and DDPM/DDIM sampling on any network (a small stand-in conv net here:
the diffusion layer must not depend on any registry network)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vmddpm.diffusion import Diffusion


class TinyEps(nn.Module):
    """A stand-in eps-network: conv stack with a learned timestep embedding."""

    def __init__(self, ch: int = 8, timesteps: int = 1000) -> None:
        super().__init__()
        self.emb = nn.Embedding(timesteps, ch)
        self.c1 = nn.Conv2d(1, ch, 3, padding=1)
        self.c2 = nn.Conv2d(ch, 1, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.c2(F.silu(self.c1(x) + self.emb(t)[:, :, None, None]))


@pytest.fixture
def diffusion(make_cfg) -> Diffusion:
    return Diffusion(make_cfg().diffusion)


@pytest.fixture
def net() -> nn.Module:
    torch.manual_seed(0)
    return TinyEps().eval()


def test_schedule_matches_config(make_cfg, diffusion: Diffusion) -> None:
    cfg = make_cfg()
    betas = diffusion.train_scheduler.betas
    assert len(betas) == cfg.diffusion.timesteps
    assert betas[0].item() == pytest.approx(cfg.diffusion.beta_start)
    assert betas[-1].item() == pytest.approx(cfg.diffusion.beta_end)
    assert diffusion.scheduler("ddim").config.prediction_type == cfg.diffusion.prediction_type


def test_loss_reproducible_with_generator(diffusion: Diffusion, net: nn.Module) -> None:
    x0 = torch.rand(4, 1, 16, 16) * 2 - 1
    a = diffusion.loss(net, x0, generator=torch.Generator().manual_seed(3))
    b = diffusion.loss(net, x0, generator=torch.Generator().manual_seed(3))
    c = diffusion.loss(net, x0, generator=torch.Generator().manual_seed(4))
    assert a.ndim == 0 and torch.isfinite(a)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_loss_targets(make_cfg, net: nn.Module, prediction: str) -> None:
    d = Diffusion(make_cfg(f"diffusion.prediction_type={prediction}").diffusion)
    loss = d.loss(net, torch.zeros(2, 1, 16, 16), generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and net.c1.weight.grad is not None


@pytest.mark.parametrize(
    ("sampler", "steps", "eta"), [("ddim", 10, 0.0), ("ddim", 10, 0.5), ("ddpm", 30, 0.0)]
)
def test_per_image_seeds(diffusion: Diffusion, net: nn.Module, sampler: str, steps: int, eta: float) -> None:
    seeds = [100 + i for i in range(9)]
    batch = diffusion.sample(net, (1, 16, 16), seeds, sampler, steps, eta, batch_size=9)
    again = diffusion.sample(net, (1, 16, 16), seeds, sampler, steps, eta, batch_size=9)
    alone = diffusion.sample(net, (1, 16, 16), [seeds[7]], sampler, steps, eta, batch_size=9)
    assert batch.shape == (9, 1, 16, 16)
    assert batch.min() >= -1 and batch.max() <= 1
    assert torch.equal(batch, again)  # same seeds -> same images
    assert torch.equal(alone[0], batch[7])  # image 7 alone == image 7 of the batch, bit for bit
    assert not torch.equal(batch[0], batch[1])  # different seeds -> different images
    chunked = diffusion.sample(net, (1, 16, 16), seeds, sampler, steps, eta, batch_size=4)
    assert chunked.shape == batch.shape


def test_bad_sampler_and_steps(diffusion: Diffusion, net: nn.Module) -> None:
    with pytest.raises(ValueError, match="sampler"):
        diffusion.sample(net, (1, 16, 16), [0], "euler", 10)
    with pytest.raises(ValueError, match="steps"):
        diffusion.sample(net, (1, 16, 16), [0], "ddim", 0)
