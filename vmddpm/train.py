"""`vmddpm train`: turn a registry network into a trained diffusion model, resumably.

Files in `cfg.train_dir(dataset, model)` (= `runs/<dataset>/<model>/train/`, the declared output of the
train stage as a whole folder):

- `last.pt`     full training state, rewritten atomically every `train.checkpoint_every` steps and at
                the end: {model, ema, optimizer, scaler, lr_scheduler, step, rng (python/numpy/torch/
                cuda), noise_rng (per rank), sampler (seed/epoch/offset), config (resolved), signature,
                version, scan_backend, history}. `vmddpm train` resumes from it automatically.
- `model.pt`    written once at the end: {model, ema, step, signature, config, version, scan_backend,
                rank_hashes}. The sample stage reads its `ema` (or `model`) weights. When it exists and
                its step >= `train.steps`, re-running `vmddpm train` is a no-op.
- `history.csv` step, loss, lr, images_per_s every `train.log_every` steps (rewritten at each checkpoint,
                so it always matches `last.pt`).
- `grids/step_XXXXXXXX.png` EMA sample grids every `train.sample_every` steps (0 = never).

Design choices:
- determinism: model init from `seed`; the diffusion noise, the timesteps and the hflip augmentation
  come from one per-rank `torch.Generator` whose state is checkpointed; the data order comes from a
  per-epoch permutation of `seed + epoch`, resumed from the number of samples consumed; the DataLoader
  gets its own generator, so nothing depends on the global RNG except dropout (also checkpointed).
  With `train.deterministic` a killed and resumed CPU run reaches bit-identical weights.
- DDP under `torchrun`: gloo on CPU, nccl on CUDA; each rank reads its own shard of every epoch's
  permutation and its own noise seed; rank 0 alone writes files and logs to MLflow.
- AMP (bf16/fp16) only on CUDA; the loss and the optimiser state stay fp32 (the nets keep the scan
  state in fp32).
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from vmddpm import __version__, cpu_memory
from vmddpm.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from vmddpm.config import Config
from vmddpm.errors import UserError
from vmddpm.io import write_png_grid, write_text
from vmddpm.tracking import NullRun, start_run

if TYPE_CHECKING:  # diffusers costs seconds of import: GAN runs and no-op reruns never need it
    from vmddpm.diffusion import Diffusion

log = logging.getLogger(__name__)

LAST = "last.pt"
FINAL = "model.pt"
HISTORY = "history.csv"


# ---------------------------------------------------------------------------------------- helpers
def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is visible; set train.device=auto or cpu")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(choice)


def scan_backend_of(net: nn.Module, device: torch.device) -> str:
    """The resolved S6 backend of a vmunet net, "none" for nets without one."""
    fn = getattr(net, "resolved_scan_backend", None)
    return str(fn(device)) if callable(fn) else "none"


def set_determinism(enabled: bool) -> None:
    """Deterministic kernels (bit-identical resume on CPU); CUDA also needs the cuBLAS workspace knob."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(enabled)


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names and raw tensor bytes (equal hash <=> bit-identical weights)."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous().reshape(-1)
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class EpochSampler(Sampler[int]):
    """Endless indices: epoch e is a permutation seeded by `seed + e`, sharded over ranks.

    The state is the number of samples this rank has consumed, so a resumed run continues mid-epoch
    with exactly the indices an uninterrupted run would have drawn (independent of DataLoader
    prefetching, which runs ahead of what training consumed).
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, start: int = 0) -> None:
        self.n, self.seed, self.rank, self.world, self.start = n, seed, rank, world, start
        self.per_rank = math.ceil(n / world)

    def state(self, consumed: int) -> dict[str, int]:
        return {"seed": self.seed, "epoch": consumed // self.per_rank, "offset": consumed % self.per_rank}

    def _epoch(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        order += order[: self.per_rank * self.world - self.n]  # pad like DistributedSampler
        return order[self.rank :: self.world]

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start, self.per_rank)
        while True:
            yield from self._epoch(epoch)[offset:]
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:  # endless; DataLoader only uses this for len(loader)
        return 2**62


def load_dataset(cfg: Config, dataset: str) -> Dataset:
    """The training split of a prepared dataset, as (1, H, W) float tensors in [-1, 1]."""
    folder = cfg.prepared_dir(dataset)
    manifest = folder / "manifest.csv"
    if not folder.is_dir() or not manifest.is_file():
        raise UserError(
            f"{folder}: no prepared dataset (manifest.csv missing); "
            f"run `vmddpm prepare --dataset {dataset}` first"
        )
    from vmddpm.data.dataset import SliceDataset

    ds = SliceDataset(folder, split="train", image_size=cfg.data.image_size, hflip=False)
    if len(ds) == 0:
        raise UserError(
            f"{manifest}: no training slices (split == train); rerun `vmddpm prepare --dataset {dataset}`"
        )
    return ds


def _batch_images(batch: Any) -> torch.Tensor:
    if isinstance(batch, (list, tuple)):
        batch = batch[0]
    if isinstance(batch, dict):
        batch = batch["image"]
    return batch


def make_grid_png(images: torch.Tensor, path: Path) -> Path:
    """Save images in [-1, 1] as one grayscale PNG grid, atomically (the samples' uint8 conversion)."""
    from vmddpm.sample import to_uint8

    return write_png_grid(path, to_uint8(images))


HISTORY_FIELDS = ("step", "loss", "lr", "images_per_s")


def write_history(path: Path, rows: list[dict[str, float]], fields: Sequence[str] = HISTORY_FIELDS) -> None:
    """history.csv, atomically: one row per logged step (`loss` is what the run minimises)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields))
    w.writeheader()
    w.writerows(rows)
    write_text(path, buf.getvalue())


def already_trained(final: Path, signature: dict[str, Any], steps: int) -> bool:
    """True when `model.pt` exists for this very model (signature checked) at >= `steps`: a rerun of
    `vmddpm train` is then a no-op."""
    if not final.is_file():
        return False
    done = int(load_checkpoint(final, expect=signature)["step"])
    if done >= steps:
        log.info("%s: already trained to step %d; nothing to do", final, done)
        return True
    return False


@torch.no_grad()
def update_ema(ema: AveragedModel, net: nn.Module, step: int, warmup_steps: int) -> None:
    """EMA step; during `train.ema_warmup_steps` the EMA copies the weights exactly instead."""
    if step <= warmup_steps:
        for pe, p in zip(ema.module.state_dict().values(), net.state_dict().values(), strict=True):
            pe.copy_(p)
    else:
        ema.update_parameters(net)


def resume(
    last: Path, signature: dict[str, Any], parts: dict[str, Any], noise_gen: torch.Generator, rank: int = 0
) -> tuple[int, list[dict[str, float]], dict[str, Any] | None]:
    """Load `last.pt` (when it exists) into `parts` (checkpoint key -> object with load_state_dict),
    the global RNGs and this rank's noise generator. Returns (step, history, checkpoint): (0, [],
    None) for a fresh run."""
    if not last.is_file():
        return 0, [], None
    state = load_checkpoint(last, expect=signature)
    for key, obj in parts.items():
        obj.load_state_dict(state[key])
    restore_rng_state(state["rng"])
    gens = state["noise_rng"]
    noise_gen.set_state(gens[rank] if rank < len(gens) else gens[0])
    return int(state["step"]), [dict(r) for r in state.get("history", [])], state


def close_run(run: Any, out: Path, final: Path) -> None:
    """The end of every train run: tag the final checkpoint, attach the history and its path."""
    run.set_tags({"checkpoint": str(final)})
    run.log_artifact(out / HISTORY)
    write_text(out / "checkpoint.txt", f"{final}\n")
    run.log_artifact(out / "checkpoint.txt")


# ------------------------------------------------------------------------------------------ train
def train(cfg: Config, dataset: str, model: str) -> Path:
    """Train preset `model` on `dataset` (resuming from `last.pt`); returns the train folder."""
    preset = cfg.preset(model)
    cfg.dataset(dataset)
    if preset.family == "gan":
        from vmddpm.gan import train_gan

        return train_gan(cfg, dataset, model)
    from vmddpm.nn.registry import build_model, model_signature

    out = cfg.train_dir(dataset, model)
    signature = model_signature(cfg, model)
    if already_trained(out / FINAL, signature, cfg.train.steps):
        return out

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = resolve_device(cfg.train.device)
    distributed = world > 1
    if distributed and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return _train(cfg, dataset, model, out, signature, device, rank, world, build_model)
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train(
    cfg: Config,
    dataset: str,
    model: str,
    out: Path,
    signature: dict[str, Any],
    device: torch.device,
    rank: int,
    world: int,
    build_model: Any,
) -> Path:
    tc = cfg.train
    distributed = world > 1
    main = rank == 0
    set_determinism(tc.deterministic)
    data = load_dataset(cfg, dataset)
    cpu_memory.configure(cfg.cpu_memory, device.type)  # once the inputs are known good

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    net = build_model(cfg, model).to(device)
    backend = scan_backend_of(net, device)
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(tc.ema_decay), use_buffers=True)
    opt = torch.optim.AdamW(net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    warm = tc.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm > 0 else 1.0)
    use_amp = device.type == "cuda" and tc.amp != "none"
    amp_dtype = torch.bfloat16 if tc.amp == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and tc.amp == "fp16")
    noise_gen = torch.Generator("cpu").manual_seed(cfg.seed * 1009 + 17 + rank)
    from vmddpm.diffusion import Diffusion

    diffusion = Diffusion(cfg.diffusion)

    last = out / LAST
    parts = {"model": net, "ema": ema, "optimizer": opt, "lr_scheduler": sched, "scaler": scaler}
    step, history, state = resume(last, signature, parts, noise_gen, rank)
    if state is not None:
        if state["sampler"]["world"] != world and main:
            log.warning(
                "%s: resumed with %d ranks, written with %d; data order differs",
                last,
                world,
                state["sampler"]["world"],
            )
        if main:
            log.info("resuming %s from step %d", last, step)
    else:
        torch.manual_seed(cfg.seed + rank)  # per-rank dropout stream

    per_step = tc.batch_size * tc.grad_accum
    sampler = EpochSampler(len(data), cfg.seed, rank, world, start=step * per_step)
    loader = DataLoader(
        data,
        batch_size=tc.batch_size,
        sampler=sampler,
        num_workers=tc.num_workers,
        pin_memory=device.type == "cuda",
        drop_last=False,
        generator=torch.Generator().manual_seed(cfg.seed),  # keeps the global RNG untouched
        persistent_workers=False,
    )
    ddp = (
        nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)
        if distributed
        else net
    )

    ckpt_ctx = dict(
        cfg=cfg,
        out=out,
        net=net,
        ema=ema,
        opt=opt,
        sched=sched,
        scaler=scaler,
        noise_gen=noise_gen,
        sampler=sampler,
        per_step=per_step,
        signature=signature,
        backend=backend,
        world=world,
        distributed=distributed,
        main=main,
    )

    if step >= tc.steps:
        return _finish(step, history, **ckpt_ctx)

    run_cm = (
        start_run(cfg, "train", dataset=dataset, model=model, tags={"scan_backend": backend})
        if main
        else nullcontext(NullRun())
    )
    with run_cm as run:
        if main:
            run.log_params(cfg.flat())
            run.log_params({"world_size": world, "device": str(device), "resumed_from_step": step})
            log.info(
                "training %s on %s: %d steps, device %s, %d rank(s), scan backend %s",
                model,
                dataset,
                tc.steps,
                device,
                world,
                backend,
            )
        batches = iter(loader)
        bar = tqdm(
            total=tc.steps,
            initial=step,
            disable=not main,
            desc=f"train {dataset}/{model}",
            dynamic_ncols=True,
        )
        t_last, n_since = time.perf_counter(), 0
        net.train()
        while step < tc.steps:
            opt.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for micro in range(tc.grad_accum):
                x0 = _batch_images(next(batches)).to(device, non_blocking=True).float()
                if cfg.data.hflip:
                    flip = torch.rand(x0.shape[0], generator=noise_gen) < 0.5
                    x0 = torch.where(flip.to(device)[:, None, None, None], x0.flip(-1), x0)
                sync = micro == tc.grad_accum - 1 or not distributed
                with nullcontext() if sync else ddp.no_sync():
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                        loss = diffusion.loss(ddp, x0, generator=noise_gen)
                    scaler.scale(loss / tc.grad_accum).backward()
                loss_sum += float(loss.detach()) / tc.grad_accum
                n_since += x0.shape[0] * world
            if not math.isfinite(loss_sum) and not scaler.is_enabled():  # fp16: the scaler skips the step
                raise UserError(
                    f"{out}: loss is {loss_sum} at step {step}; lower train.lr or check the data, then "
                    "rerun to resume from the last checkpoint"
                )
            scaler.unscale_(opt)
            if tc.grad_clip > 0:
                nn.utils.clip_grad_norm_(net.parameters(), tc.grad_clip)
            scaler.step(opt)
            scaler.update()
            lr = sched.get_last_lr()[0]
            sched.step()
            step += 1
            update_ema(ema, net, step, tc.ema_warmup_steps)
            bar.update(1)
            if step % tc.log_every == 0 or step == tc.steps:
                loss_mean = loss_sum
                if distributed:
                    t = torch.tensor([loss_sum], device=device)
                    dist.all_reduce(t)
                    loss_mean = float(t) / world
                now = time.perf_counter()
                ips = n_since / max(now - t_last, 1e-9)
                t_last, n_since = now, 0
                row = {"step": step, "loss": loss_mean, "lr": lr, "images_per_s": ips}
                history.append(row)
                bar.set_postfix(loss=f"{loss_mean:.4f}", img_s=f"{ips:.1f}")
                metrics = {"loss": loss_mean, "lr": lr, "images_per_s": ips}
                run.log_metrics({**metrics, "peak_rss_mb": cpu_memory.peak_rss_mb()}, step=step)
            if tc.sample_every and step % tc.sample_every == 0 and main:
                grid = _sample_grid(
                    cfg, diffusion, ema.module, out / "grids" / f"step_{step:08d}.png", device
                )
                run.log_artifact(grid, "grids")
            if step % tc.checkpoint_every == 0 and step < tc.steps:
                _checkpoint(step, history, **ckpt_ctx)
        bar.close()
        path = _finish(step, history, **ckpt_ctx)
        if main:
            close_run(run, out, path)
    return out


def _sample_grid(cfg: Config, diffusion: Diffusion, net: nn.Module, path: Path, device: torch.device) -> Path:
    net.eval()
    size = cfg.data.image_size
    seeds = [cfg.sample.seed * 1_000_003 + i for i in range(cfg.train.sample_grid)]
    imgs = diffusion.sample(
        net, (1, size, size), seeds, cfg.sample.sampler, cfg.sample.steps, cfg.sample.eta, device=device
    )
    net.train()
    return make_grid_png(imgs, path)


def _full_state(
    step: int,
    history: list[dict[str, float]],
    *,
    cfg: Config,
    net: nn.Module,
    ema: AveragedModel,
    opt: Any,
    sched: Any,
    scaler: Any,
    noise_gen: torch.Generator,
    sampler: EpochSampler,
    per_step: int,
    signature: dict[str, Any],
    backend: str,
    world: int,
    distributed: bool,
    **_: Any,
) -> dict[str, Any]:
    gens = [noise_gen.get_state()]
    if distributed:
        all_gens: list[Any] = [None] * world
        dist.all_gather_object(all_gens, noise_gen.get_state())
        gens = all_gens
    return {
        "model": net.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": opt.state_dict(),
        "lr_scheduler": sched.state_dict(),
        "scaler": scaler.state_dict(),
        "step": step,
        "rng": capture_rng_state(),
        "noise_rng": gens,
        "sampler": {**sampler.state(step * per_step), "world": world},
        "config": cfg.to_dict(),
        "signature": signature,
        "version": __version__,
        "scan_backend": backend,
        "history": history,
    }


def _checkpoint(step: int, history: list[dict[str, float]], **ctx: Any) -> Path:
    state = _full_state(step, history, **ctx)  # collective under DDP: every rank calls it
    out: Path = ctx["out"]
    if ctx["main"]:
        save_checkpoint(out / LAST, state)
        write_history(out / HISTORY, history)
        log.debug("checkpoint at step %d", step)
    if ctx["distributed"]:
        dist.barrier()
    return out / LAST


def _finish(step: int, history: list[dict[str, float]], **ctx: Any) -> Path:
    """Final full checkpoint plus `model.pt`; under DDP also checks that every rank holds the same weights."""
    _checkpoint(step, history, **ctx)
    net, ema, out = ctx["net"], ctx["ema"], ctx["out"]
    digest = state_hash(net.state_dict())
    hashes = [digest]
    if ctx["distributed"]:
        hashes = [None] * ctx["world"]
        dist.all_gather_object(hashes, digest)
        if len(set(hashes)) != 1:
            raise RuntimeError(f"DDP ranks diverged: weight hashes {hashes}")
    if ctx["main"]:
        final = {
            "model": net.state_dict(),
            "ema": ema.module.state_dict(),
            "step": step,
            "signature": ctx["signature"],
            "config": ctx["cfg"].to_dict(),
            "version": __version__,
            "scan_backend": ctx["backend"],
            "rank_hashes": hashes,
        }
        save_checkpoint(out / FINAL, final)
        log.info("trained to step %d: %s", step, out / FINAL)
    if ctx["distributed"]:
        dist.barrier()
    return out / FINAL


def load_weights(cfg: Config, dataset: str, model: str, use_ema: bool) -> tuple[nn.Module, dict[str, Any]]:
    """The trained network of `model.pt` (EMA or raw weights), in eval mode on CPU."""
    from vmddpm.nn.registry import build_model, model_signature

    path = cfg.train_dir(dataset, model) / FINAL
    if not path.is_file():
        raise UserError(
            f"{path}: no trained model; run `vmddpm train --dataset {dataset} --model {model}` first"
        )
    state = load_checkpoint(path, expect=model_signature(cfg, model))
    net = build_model(cfg, model)
    net.load_state_dict(state["ema" if use_ema else "model"])
    return net.eval(), state
