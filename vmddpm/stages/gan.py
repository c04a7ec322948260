"""`vmddpm train` for the gan family (dcgan, wgan_gp): the GAN training loop.

Why a loop of its own: a GAN alternates discriminator (critic) and generator updates with two
optimisers, which the diffusion loop (`vmddpm.stages.train`) does not do. Everything around the loop is
the same training kit (`vmddpm.trainkit`), so `sample`, `evaluate` and the workflow treat GANs as any
other model:

- the same files in `cfg.train_dir(dataset, model)`: `last.pt` (full state at the end: generator,
  discriminator, EMA of the generator, both optimisers, step, global RNG states, the latent/penalty
  RNG, the data sampler position, config, signature, history), `model.pt` (written once at the end:
  `model` = generator, `ema` = EMA generator, `discriminator`, step, signature) and `history.csv`
  (step, loss, loss_g, loss_d, lr, images_per_s; `loss` is the generator loss so the column means "the
  objective being minimised" everywhere); the same step checkpoints beside it
  (`checkpoints/<run key>/`, every `train.checkpoint_every` steps, at a SIGINT/SIGTERM and at the end);
- automatic resume from the newest good checkpoint of the same knobs; re-invoking a finished run
  (model.pt at >= train.steps) is a no-op; the same output lock and clean stop on a signal;
- one MLflow run (stage=train) with the losses per logged step;
- determinism as in the diffusion loop: init from `seed`, latents and gradient-penalty mixing weights
  from one checkpointed `torch.Generator`, data order from `EpochSampler`; a killed and resumed CPU run
  reaches bit-identical weights.

The objectives are `vmddpm.adversarial`: `bce` (non-saturating DCGAN) and `wgan_gp` (`n_critic` critic
steps per generator step, gradient penalty `gp_weight`).
"""

from __future__ import annotations

import logging
import math
import signal
import time
from pathlib import Path
from typing import Any

import torch

from vmddpm import __version__, cpu_memory, signals
from vmddpm.adversarial import discriminator_loss, generator_loss
from vmddpm.config import Config
from vmddpm.contracts import FINAL, GAN_HISTORY_FIELDS, HISTORY, LAST
from vmddpm.errors import UserError
from vmddpm.io import output_lock
from vmddpm.runtime import resolve_device, set_determinism
from vmddpm.tracking import start_run
from vmddpm.trainkit import (
    EpochSampler,
    adam,
    already_trained,
    batch_images,
    capture_rng_state,
    close_run,
    hflip,
    load_training_split,
    make_ema,
    make_loader,
    open_checkpoints,
    prepare_outputs,
    require_prepared,
    resume,
    save_final,
    update_ema,
    write_history,
)

log = logging.getLogger(__name__)


def train_gan(cfg: Config, dataset: str, model: str) -> Path:
    """Train gan preset `model` on `dataset` (resuming from the newest good checkpoint of this
    configuration); returns the train folder."""
    preset = cfg.preset(model)
    cfg.dataset(dataset)
    if preset.family != "gan":
        raise UserError(
            f"{cfg.source}: presets.{model} is a {preset.family} model, not a GAN: `vmddpm train` trains "
            "it with the diffusion train stage (vmddpm.stages.train.train)"
        )
    out = cfg.train_dir(dataset, model)
    with output_lock(out, "train"):  # one process per output
        return _train_gan(cfg, dataset, model, out)


def _train_gan(cfg: Config, dataset: str, model: str, out: Path) -> Path:
    from tqdm.auto import tqdm

    from vmddpm.nn.registry import build_gan, model_signature

    preset = cfg.preset(model)
    signature = model_signature(cfg, model)
    final = out / FINAL
    require_prepared(cfg, dataset)
    ckpts = open_checkpoints(cfg, dataset, model, signature)
    if already_trained(final, signature, cfg.train.steps, ckpts.key):
        return out
    prepare_outputs(out, ckpts)

    tc, gc = cfg.train, cfg.baselines.gan
    device = resolve_device(tc.device, "train.device")
    set_determinism(tc.deterministic)
    data = load_training_split(cfg, dataset)
    cpu_memory.configure(cfg.cpu_memory, device.type)  # once the inputs are known good
    torch.manual_seed(cfg.seed)
    gnet, dnet = build_gan(cfg, model)
    gnet, dnet = gnet.to(device), dnet.to(device)
    ema = make_ema(gnet, tc.ema_decay)
    betas = (gc.betas[0], gc.betas[1])
    opt_g = adam(gnet.parameters(), lr=gc.lr, betas=betas, decoupled=False)
    opt_d = adam(dnet.parameters(), lr=gc.lr, betas=betas, decoupled=False)
    noise_gen = torch.Generator("cpu").manual_seed(cfg.seed * 1009 + 17)
    wgan = preset.gan_loss == "wgan_gp"
    n_critic = gc.n_critic if wgan else 1

    last = out / LAST
    parts = {"model": gnet, "discriminator": dnet, "ema": ema, "optimizer": opt_g, "optimizer_d": opt_d}
    step, history, _ = resume(ckpts, last, signature, parts, noise_gen)

    per_step = tc.batch_size * n_critic  # every critic step draws a fresh real batch
    sampler = EpochSampler(len(data), cfg.seed, start=step * per_step)
    loader = make_loader(data, sampler, tc.batch_size, tc.num_workers, cfg.seed, device.type == "cuda")

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
        ckpts.save(full_state())
        write_history(out / HISTORY, history, GAN_HISTORY_FIELDS)

    def finish() -> Path:
        save_final(
            out,
            ckpts,
            full_state(),
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
        write_history(out / HISTORY, history, GAN_HISTORY_FIELDS)
        log.info("trained to step %d: %s", step, final)
        return final

    if step >= tc.steps:
        finish()
        return out

    with (
        start_run(
            cfg, "train", dataset=dataset, model=model, tags={"scan_backend": "none"}, output=out
        ) as run,
        signals.deferred(),  # a signal ends the step in progress
    ):
        run.log_params(cfg.flat())
        run.log_params({"device": str(device), "resumed_from_step": step, "run_key": ckpts.key})
        log.info(
            "training %s (%s) on %s: %d steps, device %s", model, preset.gan_loss, dataset, tc.steps, device
        )
        if tc.eval_every:
            log.info("train.eval_every: GANs are not evaluated during training (diffusion models only)")
        batches = iter(loader)
        bar = tqdm(total=tc.steps, initial=step, desc=f"train {dataset}/{model}", dynamic_ncols=True)
        t_last, n_since = time.perf_counter(), 0
        gnet.train()
        dnet.train()
        try:  # the bar closes (its line ends) before an error reaches the CLI's one line
            while step < tc.steps:
                for _ in range(n_critic):
                    real = batch_images(next(batches)).to(device).float()
                    if cfg.data.hflip:
                        real = hflip(real, noise_gen)
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
                        f"baselines.gan.lr (set in {cfg.origin('baselines.gan.lr')}), then rerun (new knobs "
                        "train from step 0)"
                    )
                bar.update(1)
                if step % tc.log_every == 0 or step == tc.steps:
                    now = time.perf_counter()
                    ips = n_since / max(now - t_last, 1e-9)
                    t_last, n_since = now, 0
                    row = {
                        "step": step,
                        "loss": lg,
                        "loss_g": lg,
                        "loss_d": ld,
                        "lr": gc.lr,
                        "images_per_s": ips,
                    }
                    history.append(row)
                    bar.set_postfix(g=f"{lg:.3f}", d=f"{ld:.3f}")
                    metrics = {k: v for k, v in row.items() if k != "step"}
                    run.log_metrics({**metrics, "peak_rss_mb": cpu_memory.peak_rss_mb()}, step=step)
                if step % tc.checkpoint_every == 0 and step < tc.steps:
                    checkpoint()
                if (sig := signals.stop_requested()) is not None:
                    if step % tc.checkpoint_every and step < tc.steps:
                        checkpoint()
                    log.warning(
                        "stopped by %s at step %d; checkpoint written", signal.Signals(sig).name, step
                    )
                    raise signals.Interrupted(sig)
        finally:
            bar.close()
        path = finish()
        close_run(run, cfg, dataset, model, path, ema.module)
    return out
