"""Baseline networks (unet_attn, dit, the GAN pair) and every preset of params.yaml `models:`:
build, forward/backward shapes at 32² and 64², and short training runs that learn."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import TINY
from vmddpm.diffusion import Diffusion
from vmddpm.errors import UserError
from vmddpm.nn.registry import build_gan, build_model, count_parameters, model_signature

TINY_BASELINES = (
    "baselines.unet_attn.base_channels=8",
    "baselines.unet_attn.channel_mult=[1, 2]",
    "baselines.unet_attn.attn_resolutions=[16]",
    "baselines.unet_attn.heads=2",
    "baselines.dit.hidden_size=32",
    "baselines.dit.depth=2",
    "baselines.dit.heads=4",
    "baselines.gan.z_dim=16",
    "baselines.gan.g_channels=8",
    "baselines.gan.d_channels=8",
)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _models(make_cfg) -> list[str]:
    return list(make_cfg().models)


@pytest.mark.parametrize("size", [32, 64])
def test_every_model_runs_forward_backward(make_cfg, size: int) -> None:
    cfg = make_cfg(*TINY, *TINY_BASELINES)
    assert {"unet_attn", "dit", "dcgan", "wgan_gp"} <= set(cfg.models)
    for name in cfg.models:
        torch.manual_seed(0)
        net = build_model(cfg, name, size)
        assert count_parameters(net) > 0
        if cfg.preset(name).family == "gan":
            gen, disc = build_gan(cfg, name, size)
            img = gen(torch.randn(2, cfg.baselines.gan.z_dim))
            assert img.shape == (2, 1, size, size) and img.abs().max() <= 1
            score = disc(img)
            assert score.shape == (2,)
            score.sum().backward()
            grads = [p.grad for p in gen.parameters()] + [p.grad for p in disc.parameters()]
        else:
            x = torch.randn(2, 1, size, size)
            eps = net(x, torch.tensor([3, 700]))
            assert eps.shape == x.shape, name
            eps.square().mean().backward()
            grads = [p.grad for p in net.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
        assert model_signature(cfg, name, size)["family"] == cfg.preset(name).family


@pytest.mark.parametrize("name", ["unet_attn", "dit"])
def test_diffusion_baseline_loss_falls_on_fixed_batch(make_cfg, name: str) -> None:
    cfg = make_cfg(*TINY, *TINY_BASELINES, "data.image_size=16")
    torch.manual_seed(0)
    net = build_model(cfg, name)
    diffusion = Diffusion(cfg.diffusion)
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    x0 = torch.stack([((xx - c) ** 2 + (yy - c) ** 2 < 20).float() * 2 - 1 for c in (5.0, 8.0, 10.0, 7.0)])[
        :, None
    ]
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    losses = []
    for _ in range(20):
        # same timesteps and noise every step: the target is fixed, so the loss must fall
        loss = diffusion.loss(net, x0, generator=torch.Generator().manual_seed(1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


def test_gan_needs_power_of_two_size(make_cfg) -> None:
    cfg = make_cfg(*TINY, *TINY_BASELINES)
    with pytest.raises(UserError, match=r"params.yaml.*dcgan.*power of two"):
        build_gan(cfg, "dcgan", 48)


def test_dit_rejects_indivisible_patch(make_cfg) -> None:
    cfg = make_cfg(*TINY, *TINY_BASELINES, "baselines.dit.patch_size=5")
    with pytest.raises(UserError, match=r"params.yaml.*presets.dit.*patch_size"):
        build_model(cfg, "dit", 32)
