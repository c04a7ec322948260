"""`vmddpm train` for the diffusion families (vmunet, unet_attn, dit): a registry network -> a trained
diffusion model, resumably. (The gan family trains in `vmddpm.stages.gan`; `vmddpm train` picks by family.)

Files in `cfg.train_dir(dataset, model)` (= `runs/<dataset>/<model>/train/`, the declared output of the
train stage as a whole folder; names in `vmddpm.contracts`):

- `last.pt`     full training state at the end: {model, ema, optimizer, scaler, lr_scheduler, step, rng
                (python/numpy/torch/cuda), noise_rng (per rank), sampler (seed/epoch/offset), config
                (resolved), signature, version, scan_backend, history, run_key, knobs}.
- `model.pt`    written once at the end: {model, ema, step, signature, config, version, scan_backend,
                rank_hashes}. The sample stage reads its `ema` (or `model`) weights. When it exists and
                its step >= `train.steps`, re-running `vmddpm train` is a no-op.
- `history.csv` step, loss, lr, images_per_s every `train.log_every` steps (rewritten at each checkpoint,
                so it always matches the newest checkpoint).
- `grids/step_XXXXXXXX.png` EMA sample grids every `train.sample_every` steps (0 = never).
- `eval_history.csv` (with `train.eval_every` > 0) step, fid, kid_mean, kid_std, ... of
                `train.eval_images` fixed-seed EMA samples (DDIM, `train.eval_steps`) at step 0, every
                `train.eval_every` steps and at the end, against the evaluate stage's reference set and
                extractor (`vmddpm.evalkit.TrainingEval`); also MLflow metrics `eval_fid`, `eval_kid`
                at the training step. Kept in every checkpoint and rewritten with `history.csv`, so a
                resumed run neither loses nor repeats a point. `eval/step_XXXXXXXX.png`: the first
                samples of each evaluation (restored from the checkpoint on resume).

Beside it, `checkpoints/<run key>/step_XXXXXXXX.pt` (`vmddpm.trainkit.Checkpoints`): the same full state
every `train.checkpoint_every` steps, at a SIGINT/SIGTERM and at the end, the last
`train.keep_checkpoints` kept. Neither Snakemake nor DVC deletes it (it is not a declared output), so
any rerun, by hand or by either tool, resumes from the newest one that loads whose knobs match; changed
knobs train from step 0 beside it (a warning names them).

One process per output: the run holds `runs/<dataset>/<model>/.train.lock`; a second `vmddpm train` of
the same model stops at once, naming the first one's pid. SIGINT or SIGTERM (Ctrl-C, `kill`, a SLURM
time limit) ends the step in progress, writes its checkpoint, closes the MLflow run as KILLED and exits.

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

The run is a `Trainer`: the state of one training run (networks, optimiser, generators, step, history)
with one method per thing a step does, so `train()` reads as the loop it is.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from vmddpm import __version__, cpu_memory, signals
from vmddpm.config import Config
from vmddpm.contracts import EVAL_GRIDS, EVAL_HISTORY, EVAL_HISTORY_FIELDS, FINAL, HISTORY, image_seed
from vmddpm.errors import UserError
from vmddpm.io import output_lock, write_png_grid
from vmddpm.nn.scan2d import unpacked_param_counts
from vmddpm.runtime import (
    explain_scan_backend,
    is_out_of_memory,
    out_of_memory,
    resolve_device,
    scan_backend_of,
    set_determinism,
    state_hash,
)
from vmddpm.tracking import NullRun, start_run
from vmddpm.trainkit import (
    Checkpoints,
    EpochSampler,
    RepackingOptimizer,
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
    restore_rng_state,
    resume,
    save_final,
    update_ema,
    write_history,
)

log = logging.getLogger(__name__)

EVAL_GRID_MAX = 16
"""Samples of each training-time evaluation kept as its grid (and in the checkpoint)."""


def train(cfg: Config, dataset: str, model: str) -> Path:
    """Train diffusion preset `model` on `dataset` (resuming from the newest good checkpoint of this
    configuration); returns the train folder."""
    preset = cfg.preset(model)
    cfg.dataset(dataset)
    if preset.family == "gan":
        raise UserError(
            f"{cfg.source}: presets.{model} is a gan model: `vmddpm train` trains it with the gan stage "
            "(vmddpm.stages.gan.train_gan)"
        )
    out = cfg.train_dir(dataset, model)
    rank = int(os.environ.get("RANK", "0"))
    with output_lock(out, "train") if rank == 0 else nullcontext():  # one process per output
        return _train_locked(cfg, dataset, model, out, rank)


def _train_locked(cfg: Config, dataset: str, model: str, out: Path, rank: int) -> Path:
    from vmddpm.nn.registry import model_signature

    preset = cfg.preset(model)
    signature = model_signature(cfg, model)
    require_prepared(cfg, dataset)  # a missing prepared set is named before anything is written
    ckpts = open_checkpoints(cfg, dataset, model, signature)
    if already_trained(out / FINAL, signature, cfg.train.steps, ckpts.key):
        return out
    if rank == 0:
        prepare_outputs(out, ckpts)  # read-only, full or blocked places fail now, not at a checkpoint

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(cfg.train.device, "train.device")
    distributed = world > 1
    if distributed and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    trainer = None
    try:
        trainer = Trainer.start(cfg, dataset, model, out, signature, ckpts, device, rank, world)
        return trainer.run()
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        if trainer is not None:  # free what the failed step held before the error propagates
            trainer.opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        tc = cfg.train
        knobs: dict[str, object] = {"train.batch_size": tc.batch_size, "train.grad_accum": tc.grad_accum}
        if preset.family == "vmunet":
            knobs["model.checkpointing"] = cfg.model_config(model).checkpointing
        knobs["train.amp"] = tc.amp
        backend = trainer.backend if trainer is not None else "not yet resolved"
        raise out_of_memory("train", device, knobs, backend) from None
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class Trainer:
    """One diffusion training run: everything `last.pt` holds, plus where it runs."""

    cfg: Config
    dataset: str
    model: str
    out: Path
    signature: dict[str, Any]
    ckpts: Checkpoints
    device: torch.device
    rank: int
    world: int
    net: nn.Module
    ema: AveragedModel
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    noise_gen: torch.Generator
    diffusion: Any
    backend: str
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    eval_history: list[dict[str, float]] = field(default_factory=list)
    eval_grids: dict[int, torch.Tensor] = field(default_factory=dict)
    evaluator: Any = None
    sampler: EpochSampler | None = None
    loader: Any = None
    ddp: nn.Module | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def per_step(self) -> int:
        """Samples one optimiser step consumes on this rank."""
        return self.cfg.train.batch_size * self.cfg.train.grad_accum

    @property
    def use_amp(self) -> bool:
        return self.device.type == "cuda" and self.cfg.train.amp != "none"

    # -- set-up --------------------------------------------------------------------------------------
    @classmethod
    def start(
        cls,
        cfg: Config,
        dataset: str,
        model: str,
        out: Path,
        signature: dict[str, Any],
        ckpts: Checkpoints,
        device: torch.device,
        rank: int,
        world: int,
    ) -> Trainer:
        """Build the networks and optimiser from `seed`, then resume from the newest good checkpoint of
        this configuration when there is one."""
        from vmddpm.diffusion import Diffusion
        from vmddpm.nn.registry import build_model

        tc = cfg.train
        set_determinism(tc.deterministic)
        data = load_training_split(cfg, dataset)
        cpu_memory.configure(cfg.cpu_memory, device.type)  # once the inputs are known good
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        net = build_model(cfg, model).to(device)
        opt = adam(net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, decoupled=True)
        warm = tc.warmup_steps
        t = cls(
            cfg=cfg,
            dataset=dataset,
            model=model,
            out=out,
            signature=signature,
            ckpts=ckpts,
            device=device,
            rank=rank,
            world=world,
            net=net,
            ema=make_ema(net, tc.ema_decay),
            opt=opt,
            sched=torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: min(1.0, (s + 1) / warm) if warm > 0 else 1.0
            ),
            scaler=torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and tc.amp == "fp16"),
            noise_gen=torch.Generator("cpu").manual_seed(cfg.seed * 1009 + 17 + rank),
            diffusion=Diffusion(cfg.diffusion),
            backend=scan_backend_of(net, device),
        )
        if rank == 0:
            log.info("scan backend %s", explain_scan_backend(net, device)[1])
        t._resume()
        t.sampler = EpochSampler(len(data), cfg.seed, rank, world, start=t.step * t.per_step)
        t.loader = make_loader(
            data, t.sampler, tc.batch_size, tc.num_workers, cfg.seed, pin_memory=device.type == "cuda"
        )
        t.ddp = (
            nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)
            if t.distributed
            else net
        )
        return t

    def _resume(self) -> None:
        last = self.out / "last.pt"
        parts = {
            "model": self.net,
            "ema": self.ema,
            "optimizer": RepackingOptimizer(self.opt, unpacked_param_counts(self.net)),
            "lr_scheduler": self.sched,
            "scaler": self.scaler,
        }
        self.step, self.history, state = resume(
            self.ckpts, last, self.signature, parts, self.noise_gen, self.rank
        )
        if state is None:
            torch.manual_seed(self.cfg.seed + self.rank)  # per-rank dropout stream
            return
        self.eval_history = [dict(r) for r in state.get("eval_history", [])]
        self.eval_grids = {int(k): v for k, v in state.get("eval_grids", {}).items()}
        if self.main:  # the folder may have been deleted by an orchestrator: the grids come back too
            for step, images in self.eval_grids.items():
                write_png_grid(self._eval_grid_path(step), images.numpy())
        if state["sampler"]["world"] != self.world and self.main:
            log.warning(
                "%s: resumed with %d ranks, written with %d; data order differs",
                self.ckpts.folder,
                self.world,
                state["sampler"]["world"],
            )

    # -- the loop ------------------------------------------------------------------------------------
    def run(self) -> Path:
        """Train to `train.steps` (checkpointing, logging, grids), then write `model.pt`."""
        tc, cfg = self.cfg.train, self.cfg
        if self.step >= tc.steps:
            self.finish()
            return self.out
        run_cm = (
            start_run(
                cfg,
                "train",
                dataset=self.dataset,
                model=self.model,
                tags={"scan_backend": self.backend},
                output=self.out,
            )
            if self.main
            else nullcontext(NullRun())
        )
        with run_cm as run:
            if self.main:
                run.log_params(cfg.flat())
                run.log_params(
                    {
                        "world_size": self.world,
                        "device": str(self.device),
                        "resumed_from_step": self.step,
                        "run_key": self.ckpts.key,
                    }
                )
                log.info(
                    "training %s on %s: %d steps, device %s, %d rank(s), scan backend %s",
                    self.model,
                    self.dataset,
                    tc.steps,
                    self.device,
                    self.world,
                    self.backend,
                )
            if self.main and self.eval_history:  # a resumed run's series starts with the points it kept
                for row in self.eval_history:
                    run.log_metrics(_eval_metrics(row), step=int(row["step"]))
            if tc.eval_every and self.step == 0:
                self.evaluate_progress(run)  # the untrained model: the curve's first point
            batches = iter(self.loader)
            bar = tqdm(
                total=tc.steps,
                initial=self.step,
                disable=not self.main,
                desc=f"train {self.dataset}/{self.model}",
                dynamic_ncols=True,
            )
            meter = _Throughput()
            self.net.train()
            # the bar closes (its line ends) before an error reaches the CLI's one line; a signal ends
            # the step in progress, never a numba kernel
            with bar, signals.deferred():
                while self.step < tc.steps:
                    try:
                        loss, lr = self.optimise(batches, meter)
                    except RuntimeError:  # e.g. a DataLoader worker that the same Ctrl-C ended
                        if self._stop_signal():
                            raise signals.Interrupted(self._stop_signal() or 2) from None
                        raise
                    bar.update(1)
                    if self.step % tc.log_every == 0 or self.step == tc.steps:
                        self.log_step(run, bar, loss, lr, meter)
                    if tc.sample_every and self.step % tc.sample_every == 0 and self.main:
                        run.log_artifact(self.sample_grid(), "grids")
                    if tc.eval_every and (self.step % tc.eval_every == 0 or self.step == tc.steps):
                        self.evaluate_progress(run)
                    if self.step % tc.checkpoint_every == 0 and self.step < tc.steps:
                        self.checkpoint()
                    if (sig := self._stop_signal()) is not None:
                        if self.step % tc.checkpoint_every and self.step < tc.steps:
                            self.checkpoint()
                        if self.main:
                            log.warning("stopped by %s at step %d; checkpoint written", sig.name, self.step)
                        raise signals.Interrupted(sig)
            path = self.finish()
            if self.main and (self.out / EVAL_HISTORY).is_file():
                run.log_artifact(self.out / EVAL_HISTORY)
            if self.main:
                close_run(run, cfg, self.dataset, self.model, path, self.ema.module)
        return self.out

    def _stop_signal(self) -> Any:
        """The pending SIGINT/SIGTERM, agreed over ranks (any rank's signal stops all at the same step)."""
        sig = signals.stop_requested()
        if self.distributed:
            t = torch.tensor([sig or 0], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            sig = int(t) or None
        return signal.Signals(sig) if sig else None

    def optimise(self, batches: Iterator[Any], meter: _Throughput) -> tuple[float, float]:
        """One optimiser step over `train.grad_accum` micro-batches; returns (mean loss, lr used)."""
        tc = self.cfg.train
        amp_dtype = torch.bfloat16 if tc.amp == "bf16" else torch.float16
        self.opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for micro in range(tc.grad_accum):
            x0 = batch_images(next(batches)).to(self.device, non_blocking=True).float()
            if self.cfg.data.hflip:
                x0 = hflip(x0, self.noise_gen)
            sync = micro == tc.grad_accum - 1 or not self.distributed
            with nullcontext() if sync else self.ddp.no_sync():
                with torch.autocast(self.device.type, dtype=amp_dtype, enabled=self.use_amp):
                    loss = self.diffusion.loss(self.ddp, x0, generator=self.noise_gen)
                self.scaler.scale(loss / tc.grad_accum).backward()
            loss_sum += float(loss.detach()) / tc.grad_accum
            meter.n += x0.shape[0] * self.world
        if not math.isfinite(loss_sum) and not self.scaler.is_enabled():  # fp16: the scaler skips the step
            raise UserError(
                f"{self.out}: loss is {loss_sum} at step {self.step}; lower train.lr (set in "
                f"{self.cfg.origin('train.lr')}) or check the data, then rerun (new knobs train from step 0)"
            )
        self.scaler.unscale_(self.opt)
        if tc.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.net.parameters(), tc.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        lr = self.sched.get_last_lr()[0]
        self.sched.step()
        self.step += 1
        update_ema(self.ema, self.net, self.step, tc.ema_warmup_steps)
        return loss_sum, lr

    def log_step(self, run: Any, bar: Any, loss: float, lr: float, meter: _Throughput) -> None:
        """A history row and the MLflow metrics (loss averaged over ranks)."""
        if self.distributed:
            t = torch.tensor([loss], device=self.device)
            dist.all_reduce(t)
            loss = float(t) / self.world
        ips = meter.rate()
        self.history.append({"step": self.step, "loss": loss, "lr": lr, "images_per_s": ips})
        bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{ips:.1f}")
        metrics = {"loss": loss, "lr": lr, "images_per_s": ips}
        run.log_metrics({**metrics, "peak_rss_mb": cpu_memory.peak_rss_mb()}, step=self.step)

    def sample_grid(self) -> Path:
        """An EMA sample grid (the sample stage's seeds and sampler) under grids/."""
        from vmddpm.generation import to_uint8

        cfg, net = self.cfg, self.ema.module
        path = self.out / "grids" / f"step_{self.step:08d}.png"
        net.eval()
        size = cfg.data.image_size
        seeds = [image_seed(cfg.sample.seed, i) for i in range(cfg.train.sample_grid)]
        sc = cfg.sample
        imgs = self.diffusion.sample(
            net, (1, size, size), seeds, sc.sampler, sc.steps, sc.eta, device=self.device
        )
        net.train()
        return write_png_grid(path, to_uint8(imgs))

    def _eval_grid_path(self, step: int) -> Path:
        return self.out / EVAL_GRIDS / f"step_{step:08d}.png"

    def evaluate_progress(self, run: Any) -> None:
        """FID/KID of `train.eval_images` fixed-seed EMA samples (DDIM, `train.eval_steps`) at this step:
        a row of `eval_history`, MLflow's `eval_fid`/`eval_kid` at the step, and a grid of the first
        samples. Rank 0 only; the global RNG states are restored afterwards, so evaluating never changes
        what training draws next (the weights are those of a run without it)."""
        if not self.main or any(int(r["step"]) == self.step for r in self.eval_history):
            return
        from vmddpm.evalkit import TrainingEval
        from vmddpm.generation import to_uint8

        cfg, tc = self.cfg, self.cfg.train
        t0 = time.perf_counter()
        rng = capture_rng_state()
        try:
            if self.evaluator is None:
                self.evaluator = TrainingEval(cfg, self.dataset)
            net, size = self.ema.module, cfg.data.image_size
            seeds = [image_seed(cfg.sample.seed, i) for i in range(tc.eval_images)]
            net.eval()
            with torch.no_grad():
                imgs = self.diffusion.sample(
                    net,
                    (1, size, size),
                    seeds,
                    "ddim",
                    tc.eval_steps,
                    0.0,
                    device=self.device,
                    batch_size=min(tc.eval_images, cfg.sample.batch_size),
                )
            net.train()
            images = to_uint8(imgs)
            scores = self.evaluator.score(images)
        finally:
            restore_rng_state(rng)
        k = min(len(images), EVAL_GRID_MAX)
        self.eval_grids[self.step] = torch.from_numpy(images[:k].copy())
        write_png_grid(self._eval_grid_path(self.step), images[:k])
        row = {
            "step": self.step,
            **scores,
            "n_images": len(images),
            "sampler_steps": tc.eval_steps,
            "grid_images": k,
        }
        self.eval_history.append(row)
        run.log_metrics(_eval_metrics(row), step=self.step)
        log.info(
            "eval at step %d: FID %.4g, KID %.4g (%d DDIM-%d samples, %.1f s)",
            self.step,
            row["fid"],
            row["kid_mean"],
            len(images),
            tc.eval_steps,
            time.perf_counter() - t0,
        )

    def write_histories(self) -> None:
        write_history(self.out / HISTORY, self.history)
        if self.cfg.train.eval_every or self.eval_history:
            write_history(self.out / EVAL_HISTORY, self.eval_history, EVAL_HISTORY_FIELDS)

    # -- files ---------------------------------------------------------------------------------------
    def full_state(self) -> dict[str, Any]:
        """Everything `last.pt` holds (a collective under DDP: every rank calls it)."""
        gens = [self.noise_gen.get_state()]
        if self.distributed:
            all_gens: list[Any] = [None] * self.world
            dist.all_gather_object(all_gens, self.noise_gen.get_state())
            gens = all_gens
        assert self.sampler is not None
        return {
            "model": self.net.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.opt.state_dict(),
            "lr_scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "rng": capture_rng_state(),
            "noise_rng": gens,
            "sampler": {**self.sampler.state(self.step * self.per_step), "world": self.world},
            "config": self.cfg.to_dict(),
            "signature": self.signature,
            "version": __version__,
            "scan_backend": self.backend,
            "history": self.history,
            "eval_history": self.eval_history,
            "eval_grids": self.eval_grids,
        }

    def checkpoint(self) -> Path:
        """The full state as the store's checkpoint of this step (the newest `keep_checkpoints` kept)."""
        state = self.full_state()
        path = self.ckpts.folder
        if self.main:
            path = self.ckpts.save(state)
            self.write_histories()
            log.debug("checkpoint at step %d: %s", self.step, path)
        if self.distributed:
            dist.barrier()
        return path

    def finish(self) -> Path:
        """Final full checkpoint (store and `last.pt`) plus `model.pt`; under DDP also checks that every
        rank holds the same weights."""
        full = self.full_state()
        digest = state_hash(self.net.state_dict())
        hashes: list[Any] = [digest]
        if self.distributed:
            hashes = [None] * self.world
            dist.all_gather_object(hashes, digest)
            if len(set(hashes)) != 1:
                raise RuntimeError(f"DDP ranks diverged: weight hashes {hashes}")
        if self.main:
            final = {
                "model": self.net.state_dict(),
                "ema": self.ema.module.state_dict(),
                "step": self.step,
                "signature": self.signature,
                "config": self.cfg.to_dict(),
                "version": __version__,
                "scan_backend": self.backend,
                "rank_hashes": hashes,
            }
            save_final(self.out, self.ckpts, full, final)
            self.write_histories()
            log.info("trained to step %d: %s", self.step, self.out / FINAL)
        if self.distributed:
            dist.barrier()
        return self.out / FINAL


def _eval_metrics(row: dict[str, float]) -> dict[str, float]:
    return {"eval_fid": row["fid"], "eval_kid": row["kid_mean"], "eval_kid_std": row["kid_std"]}


class _Throughput:
    """Images per second since the last logged step."""

    def __init__(self) -> None:
        self.t, self.n = time.perf_counter(), 0

    def rate(self) -> float:
        now = time.perf_counter()
        ips = self.n / max(now - self.t, 1e-9)
        self.t, self.n = now, 0
        return ips
