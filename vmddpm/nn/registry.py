"""Named networks: every preset of `params.yaml` -> a torch module, its signature and a summary.

Why a registry: train, sample and the CLI refer to networks by preset name only (`vmddpm`,
`vmddpm_csm`, `unet_attn`, `dcgan`, ...). This module is the one place that turns a name plus the
resolved Config into a module, so the nn layer itself never reads configuration. Baselines are
imported lazily inside the builders: `import vmddpm.nn.registry` stays cheap and does not depend on
every family being importable.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch import nn

from vmddpm.config import Config
from vmddpm.errors import UserError

log = logging.getLogger(__name__)


def _image_size(cfg: Config, image_size: int | None) -> int:
    size = cfg.data.image_size if image_size is None else image_size
    if size < 1:
        raise UserError(f"--image-size must be a positive number of pixels, got {size}")
    return size


def build_model(cfg: Config, name: str, image_size: int | None = None) -> nn.Module:
    """The network of preset `name` (diffusion families: `forward(x, t) -> eps`; gan: the generator).

    Unknown names raise UserError with the nearest preset; invalid architecture values raise UserError
    naming params.yaml and the preset.
    """
    preset = cfg.preset(name)  # ConfigError (a UserError) with "did you mean" for unknown names
    size = _image_size(cfg, image_size)
    try:
        if preset.family == "vmunet":
            from vmddpm.nn.vmunet import VMUNet

            return VMUNet(**dataclasses.asdict(cfg.model_config(name)))
        if preset.family == "unet_attn":
            from vmddpm.nn.baselines.unet_attn import UNetAttn

            return UNetAttn(**dataclasses.asdict(cfg.baselines.unet_attn), image_size=size, in_channels=1)
        if preset.family == "dit":
            from vmddpm.nn.baselines.dit import DiT

            return DiT(**dataclasses.asdict(cfg.baselines.dit), image_size=size, in_channels=1)
        if preset.family == "gan":
            return build_gan(cfg, name, size)[0]
    except ValueError as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"{cfg.source}: presets.{name} ({preset.family}): {e}") from None
    raise AssertionError(preset.family)  # config.py validates the family


def build_gan(cfg: Config, name: str, image_size: int | None = None) -> tuple[nn.Module, nn.Module]:
    """(generator, discriminator) of a gan-family preset (`dcgan`, `wgan_gp`)."""
    preset = cfg.preset(name)
    if preset.family != "gan":
        raise UserError(
            f"{cfg.source}: presets.{name} is a {preset.family} model, not a gan; pick dcgan or wgan_gp"
        )
    size = _image_size(cfg, image_size)
    from vmddpm.nn.baselines.gan import Discriminator, Generator

    g = cfg.baselines.gan
    try:
        return (
            Generator(z_dim=g.z_dim, g_channels=g.g_channels, image_size=size),
            Discriminator(d_channels=g.d_channels, image_size=size),
        )
    except ValueError as e:
        raise UserError(f"{cfg.source}: presets.{name} (gan) at image size {size}: {e}") from None


def model_signature(cfg: Config, name: str, image_size: int | None = None) -> dict[str, Any]:
    """The resolved architecture of preset `name`: family plus every config value its weights depend on.

    Train stores it in the checkpoint and refuses to resume from one whose signature differs; sample
    and sweep refuse weights whose signature differs. A diffusion network's signature includes the
    diffusion process it was trained for (`diffusion.*`: the schedule and what it predicts), since its
    weights mean nothing under another. Runtime choices that do not change the weights (scan backend,
    dropout, optimiser knobs) are left out, so a checkpoint trained with the CUDA scan resumes on CPU.
    """
    preset = cfg.preset(name)
    sig: dict[str, Any] = {"family": preset.family}
    if preset.family == "vmunet":
        arch = dataclasses.asdict(cfg.model_config(name))
        for runtime in ("scan_backend", "dropout", "checkpointing"):
            arch.pop(runtime)
        sig.update(arch)
    elif preset.family == "unet_attn":
        arch = dataclasses.asdict(cfg.baselines.unet_attn)
        arch.pop("dropout")
        sig.update(arch, image_size=_image_size(cfg, image_size))  # attention placement depends on it
    elif preset.family == "dit":
        sig.update(dataclasses.asdict(cfg.baselines.dit), image_size=_image_size(cfg, image_size))
    elif preset.family == "gan":
        g = cfg.baselines.gan
        sig.update(
            gan_loss=preset.gan_loss,
            z_dim=g.z_dim,
            g_channels=g.g_channels,
            d_channels=g.d_channels,
            image_size=_image_size(cfg, image_size),
        )
    if preset.family != "gan":
        sig.update({f"diffusion.{k}": v for k, v in dataclasses.asdict(cfg.diffusion).items()})
    return sig


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _stages(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """(name, module whose parameters count, module whose output shape is shown) per reported stage:
    a VMUNet's stages (shown at the resolution their SSLayers run at), else the top-level children."""
    from vmddpm.nn.vmunet import VMUNet

    if not isinstance(model, VMUNet):
        return [(name, m, m) for name, m in model.named_children()]
    out: list[tuple[str, nn.Module, nn.Module]] = [
        ("time_embed", model.time_embed, model.time_embed),
        ("stem", model.stem, model.stem),
    ]
    out += [(f"encoder.{i}", m, m.layers[-1]) for i, m in enumerate(model.encoder)]
    out.append(("bottleneck", model.bottleneck, model.bottleneck))
    n = len(model.decoder)
    out += [(f"decoder.{n - 1 - i}", m, m.layers[-1]) for i, m in enumerate(model.decoder)]
    out.append(("out", model.out, model.out))
    return out


def _shape(out: Any) -> str:
    if isinstance(out, torch.Tensor):
        return str(tuple(out.shape))
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return str(tuple(out[0].shape))
    return "-"


def _example_input(model: nn.Module, family: str, size: int, cfg: Config) -> tuple[torch.Tensor, ...]:
    if family == "gan":
        return (torch.zeros(1, cfg.baselines.gan.z_dim),)
    return torch.zeros(1, 1, size, size), torch.zeros(1, dtype=torch.long)


def print_summary(cfg: Config, model: str, image_size: int | None = None) -> int:
    """`vmddpm model summary`: total parameters, and output shape + parameters of every stage.

    Shapes come from forward hooks on one batch-1 forward pass (no gradients) at `image_size`.
    """
    preset = cfg.preset(model)
    size = _image_size(cfg, image_size)
    net = build_model(cfg, model, size).eval()
    stages = _stages(net)
    shapes: dict[str, str] = {}

    def hook(key: str) -> Any:
        def record(_module: nn.Module, _inputs: Any, output: Any) -> None:  # None: output unchanged
            shapes.setdefault(key, _shape(output))

        return record

    handles = [shown.register_forward_hook(hook(key)) for key, _, shown in stages]
    try:
        with torch.no_grad():
            net(*_example_input(net, preset.family, size, cfg))
    except ValueError as e:
        raise UserError(f"vmddpm model summary --model {model} --image-size {size}: {e}") from None
    finally:
        for h in handles:
            h.remove()

    total = count_parameters(net)
    extra = ""
    if hasattr(net, "resolved_scan_backend"):
        extra = f", scan backend {net.resolved_scan_backend(torch.device('cpu'))}"
    print(f"model {model}: family {preset.family}, scale {cfg.scale}, input (1, 1, {size}, {size}){extra}")
    print(f"{'stage':<14} {'output shape':<24} {'parameters':>14}")
    for key, m, _ in stages:
        print(f"{key:<14} {shapes.get(key, '-'):<24} {count_parameters(m):>14,}")
    print(f"{'total':<14} {'':<24} {total:>14,}")
    if preset.family == "gan":
        _, disc = build_gan(cfg, model, size)
        print(f"{'discriminator':<14} {'':<24} {count_parameters(disc):>14,}")
    print(f"total parameters: {total:,}")
    return 0
