"""The training kit both trainers (`vmddpm.stages.train`, `vmddpm.stages.gan`) and the sample stage use.

- **Checkpoints.** `save_checkpoint` writes to a temporary file in the same folder
  (`vmddpm.io.atomic_path`), fsyncs it and `os.replace`s it over the target: a reader sees the old file or
  the new one, never a mix, and a failed write leaves the old file untouched. `load_checkpoint` uses
  `torch.load(weights_only=True)` (no pickled code runs), turns a truncated or corrupt file into a
  one-line `UserError`, and refuses a checkpoint whose model signature differs from the requested one,
  naming the differing keys. `capture_rng_state` / `restore_rng_state` store python, numpy, torch and
  CUDA generator states as tensors and plain types only, so `weights_only=True` can read them back.
- **Where checkpoints live, and which one a run may resume.** The train folder is the stage's declared
  output, and both orchestrators delete it around a failed or rerun job (Snakemake removes a job's
  outputs before it runs and after it fails; `dvc repro` removes a stage's outs before it runs). So the
  step checkpoints live beside it, in `checkpoints/<run key>/` (`Config.checkpoints_dir`), which no tool
  deletes: `Checkpoints` keeps the last `train.keep_checkpoints` of them. The run key is a hash of every
  knob the weights' trajectory depends on (`training_knobs`: the model signature, which includes the
  diffusion settings, the optimiser and EMA knobs, seed, image size, augmentation and the prepared
  data's fingerprint), never of `train.steps` (a longer run extends a shorter one) or of runtime knobs
  (device, logging, checkpoint cadence). A run resumes only from its own key's checkpoints: changed
  knobs start a new run at step 0 beside the old one (kept; a warning names the knobs that differ),
  never a silent mix of two configurations.
- **Resume.** `resume` loads the newest checkpoint that loads (a truncated or corrupt newer one is
  named in a warning and set aside as `*.corrupt`) into the parts of a run (model, EMA, optimisers,
  ...), the global RNGs and the run's noise generator; `already_trained` makes a rerun of a finished
  run a no-op.
- **Data order.** `EpochSampler` (a per-epoch permutation of `seed + epoch`, sharded over ranks, resumed
  from the number of samples consumed) and `make_loader` (a DataLoader that leaves the global RNG alone).
- **EMA.** `make_ema` (torch's `AveragedModel`) and `update_ema` (exact copies during the warm-up).
- **History.** `write_history` rewrites `history.csv` atomically at every checkpoint.
- **The trained model.** `load_trained` returns the network of `model.pt` for either family (the
  diffusion network, or a GAN's generator): the one place the sample and sweep stages read weights.

The file names of a train folder are part of the contract between stages (`vmddpm.contracts`).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import pickle
import random
import re
import shutil
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, Sampler

from vmddpm.config import Config
from vmddpm.contracts import FINAL, HISTORY, HISTORY_FIELDS, LAST, MANIFEST, TRAIN_RUN
from vmddpm.errors import UserError
from vmddpm.io import atomic_path, write_json, write_text

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------- checkpoints
#: name pattern of periodic checkpoints inside a train folder: step_00001234.pt
STEP_PATTERN = re.compile(r"^step_(\d+)\.pt$")


class CorruptCheckpoint(UserError):
    """A checkpoint file that does not load; `reason` is torch's first line."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(
            f"{path}: truncated or corrupt checkpoint ({reason}); delete it and rerun `vmddpm train`, which "
            "resumes from the newest good step checkpoint (checkpoints/ beside the train folder)"
        )
        self.path, self.reason = path, reason


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` to `path` atomically (temp file + fsync + os.replace).

    On any failure the temp file is removed and an existing `path` is left exactly as it was.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    log.debug("saved checkpoint %s", path)
    return path


def load_checkpoint(
    path: str | Path, expect: dict[str, Any] | None = None, *, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`.

    `expect`: the model signature the caller is about to load into (`model_signature(cfg, name)`); a
    checkpoint whose stored `signature` differs is refused with the differing keys named.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint; train the model first (vmddpm train)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CorruptCheckpoint(path, reason.split(". ")[0]) from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: not a vmddpm checkpoint (got {type(state).__name__}); delete it")
    if expect is not None:
        check_signature(path, state.get("signature"), expect)
    return state


def check_signature(path: Path, stored: dict[str, Any] | None, expect: dict[str, Any]) -> None:
    """Raise UserError naming every key whose value differs between `stored` and `expect`."""
    if stored is None:
        raise UserError(f"{path}: checkpoint has no model signature; it was not written by vmddpm, delete it")
    keys = sorted(set(stored) | set(expect))
    diff = [k for k in keys if _norm(stored.get(k, "<missing>")) != _norm(expect.get(k, "<missing>"))]
    if diff:
        detail = ", ".join(
            f"{k}: checkpoint {stored.get(k, '<missing>')!r} != config {expect.get(k, '<missing>')!r}"
            for k in diff
        )
        raise UserError(
            f"{path}: checkpoint is from another model or diffusion process ({detail}); use the --model "
            "and params it was trained with, or train this configuration (vmddpm train)"
        )


def _norm(v: Any) -> Any:
    """Lists and tuples compare equal (a torch round trip may turn one into the other)."""
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    return v


def step_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the periodic checkpoints `step_*.pt` in `directory`, newest first.

    Temp files of an interrupted write (`.step_....pt.xxxx.pt`) start with a dot and are ignored.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := STEP_PATTERN.match(p.name))]
    return sorted(found, reverse=True)


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The periodic checkpoint `step_*.pt` with the highest step in `directory`, else `last.pt`, else None."""
    steps = step_checkpoints(directory)
    if steps:
        return steps[0][1]
    last = Path(directory) / LAST
    return last if last.is_file() else None


# ------------------------------------------------------------------------------- the run key and its store
#: train knobs that never change a run's weights: left out of the run key
RUNTIME_TRAIN_KEYS = (
    "steps",
    "checkpoint_every",
    "keep_checkpoints",
    "sample_every",
    "sample_grid",
    "log_every",
    "num_workers",
    "device",
    "deterministic",
)
#: the train knobs a GAN's loop reads (its optimiser knobs live in baselines.gan)
GAN_TRAIN_KEYS = ("batch_size", "ema_decay", "ema_warmup_steps")


def data_fingerprint(cfg: Config, dataset: str) -> str:
    """sha256 of what training reads of the prepared dataset: its manifest and the fingerprint of the
    raw data and knobs it was prepared from (`prepare.json`; absent for hand-made test sets)."""
    folder = cfg.prepared_dir(dataset)
    h = hashlib.sha256()
    for name in (MANIFEST, "prepare.json"):
        path = folder / name
        if not path.is_file():
            continue
        data = path.read_bytes()
        if name == "prepare.json":
            # only the fingerprint: the file also names the folder it was prepared in
            with contextlib.suppress(ValueError, AttributeError):
                data = json.dumps(json.loads(data).get("fingerprint"), sort_keys=True).encode()
        h.update(name.encode() + b"\0" + data)
    return h.hexdigest()


def _signature_key(family: str, model: str, key: str) -> str:
    """The params.yaml key a model-signature entry comes from (for messages naming knobs)."""
    if key.startswith("diffusion."):
        return key
    if key == "image_size":
        return "data.image_size"
    if key in ("family", "gan_loss"):
        return f"presets.{model}.{key}"
    group = {"vmunet": "model", "unet_attn": "baselines.unet_attn", "dit": "baselines.dit"}.get(
        family, "baselines.gan"
    )
    return f"{group}.{key}"


def training_knobs(cfg: Config, dataset: str, model: str, signature: dict[str, Any]) -> dict[str, Any]:
    """Every knob the weights of a training run depend on, by params.yaml key (the run key's input)."""
    family = cfg.preset(model).family
    knobs: dict[str, Any] = {_signature_key(family, model, k): v for k, v in signature.items()}
    train = dataclasses.asdict(cfg.train)
    keys = GAN_TRAIN_KEYS if family == "gan" else [k for k in train if k not in RUNTIME_TRAIN_KEYS]
    knobs.update({f"train.{k}": train[k] for k in keys})
    knobs.update({"seed": cfg.seed, "data.image_size": cfg.data.image_size, "data.hflip": cfg.data.hflip})
    if family == "vmunet":
        knobs["model.dropout"] = cfg.model_config(model).dropout
    elif family == "unet_attn":
        knobs["baselines.unet_attn.dropout"] = cfg.baselines.unet_attn.dropout
    elif family == "gan":
        g = cfg.baselines.gan
        knobs.update({f"baselines.gan.{k}": getattr(g, k) for k in ("lr", "betas", "n_critic", "gp_weight")})
    knobs[f"data.prepared.{dataset}"] = data_fingerprint(cfg, dataset)
    return json.loads(json.dumps(knobs, default=str))  # plain JSON types: comparable after a round trip


def run_key(knobs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(knobs, sort_keys=True).encode()).hexdigest()[:16]


def knob_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'key old -> new' for every knob that differs (the data fingerprint shortened)."""

    def show(k: str, v: Any) -> str:
        return "<missing>" if v is None else (str(v)[:12] if k.startswith("data.prepared") else repr(v))

    return [
        f"{k} {show(k, old.get(k))} -> {show(k, new.get(k))}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]


@dataclass
class Checkpoints:
    """The step checkpoints of one training configuration: `checkpoints/<run key>/step_XXXXXXXX.pt`
    (the last `keep` of them) and `knobs.json` (what the key stands for)."""

    root: Path
    knobs: dict[str, Any]
    keep: int

    @property
    def key(self) -> str:
        return run_key(self.knobs)

    @property
    def folder(self) -> Path:
        return self.root / self.key

    def save(self, state: dict[str, Any]) -> Path:
        """Write `state` as the checkpoint of its step, then drop all but the newest `keep`."""
        path = self.folder / f"step_{int(state['step']):08d}.pt"
        save_checkpoint(path, {**state, "run_key": self.key, "knobs": self.knobs})
        if not (self.folder / "knobs.json").is_file():
            write_json(self.folder / "knobs.json", self.knobs)
        for _, old in step_checkpoints(self.folder)[self.keep :]:
            old.unlink(missing_ok=True)
        return path

    def latest(self, signature: dict[str, Any]) -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint of this key that loads; a corrupt newer one is named in a warning and
        renamed `*.corrupt` (kept for inspection, out of the rotation)."""
        for _, path in step_checkpoints(self.folder):
            try:
                return path, load_checkpoint(path, expect=signature)
            except CorruptCheckpoint as e:
                aside = path.with_name(path.name + ".corrupt")
                try:
                    os.replace(path, aside)
                except OSError:
                    aside = path
                log.warning(
                    "%s: truncated or corrupt checkpoint (%s); set aside as %s, falling back to an older one",
                    path,
                    e.reason,
                    aside.name,
                )
        return None

    def explain_fresh_start(self) -> None:
        """A fresh run beside checkpoints of other knobs: one warning naming what differs."""
        others = [
            (max((s for s, _ in step_checkpoints(d)), default=-1), d)
            for d in (self.root.iterdir() if self.root.is_dir() else [])
            if d.is_dir() and d.name != self.key and (d / "knobs.json").is_file()
        ]
        if not others:
            return
        step, newest = max(others)
        try:
            old = json.loads((newest / "knobs.json").read_text())
        except (OSError, ValueError):
            return
        diff = knob_diff(old, self.knobs)
        log.warning(
            "%s: no checkpoint for these knobs, training from step 0; the newest other run (%s, step %d, "
            "kept) differs in %s",
            self.root,
            newest.name,
            step,
            "; ".join(diff) or "nothing named",
        )


def open_checkpoints(cfg: Config, dataset: str, model: str, signature: dict[str, Any]) -> Checkpoints:
    return Checkpoints(
        cfg.checkpoints_dir(dataset, model),
        training_knobs(cfg, dataset, model, signature),
        cfg.train.keep_checkpoints,
    )


def copy_file(src: Path, dest: Path) -> None:
    """`dest` becomes a copy of `src`, atomically. A copy, not a hard link: DVC may move `dest` into its
    cache and make it read-only, which must never touch the store's file."""
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)


# ------------------------------------------------------------------------------------------- RNG state
def capture_rng_state() -> dict[str, Any]:
    """Every global generator's state, as tensors and plain types (loadable with weights_only=True)."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning(
                "checkpoint holds %d CUDA RNG states, %d devices here: not restored",
                len(cuda),
                torch.cuda.device_count(),
            )


# ------------------------------------------------------------------------------------------------ resume
def resume(
    ckpts: Checkpoints,
    last: Path,
    signature: dict[str, Any],
    parts: dict[str, Any],
    noise_gen: torch.Generator,
    rank: int = 0,
) -> tuple[int, list[dict[str, float]], dict[str, Any] | None]:
    """Load the newest good checkpoint of this run key (its store, or `last.pt` of the train folder when
    that is newer and of the same key) into `parts` (checkpoint key -> object with load_state_dict), the
    global RNGs and this rank's noise generator. Returns (step, history, checkpoint): (0, [], None) for
    a fresh run."""
    found = ckpts.latest(signature)
    if last.is_file():
        try:
            state = torch.load(last, map_location="cpu", weights_only=True)
        except Exception:
            state = None
        if (
            isinstance(state, dict)
            and state.get("run_key") == ckpts.key
            and (found is None or int(state["step"]) > int(found[1]["step"]))
        ):
            check_signature(last, state.get("signature"), signature)
            found = (last, state)
    if found is None:
        if rank == 0:
            ckpts.explain_fresh_start()
        return 0, [], None
    path, state = found
    for key, obj in parts.items():
        try:
            obj.load_state_dict(state[key])
        except (ValueError, RuntimeError, KeyError) as exc:
            # e.g. an optimizer state of another parameter layout (the network's weights are stored
            # under stable names, an optimizer's state by parameter position)
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(
                f"{path}: its {key!r} state does not fit this network ({reason}); it was written by "
                f"another version of vmddpm: delete {path.parent} to train this configuration afresh"
            ) from None
    restore_rng_state(state["rng"])
    gens = state["noise_rng"]
    noise_gen.set_state(gens[rank] if rank < len(gens) else gens[0])
    if rank == 0:
        log.info("resuming from %s (step %d)", path, int(state["step"]))
    return int(state["step"]), [dict(r) for r in state.get("history", [])], state


def already_trained(final: Path, signature: dict[str, Any], steps: int, key: str) -> bool:
    """True when `model.pt` exists for this very configuration (signature and run key) at >= `steps`:
    a rerun of `vmddpm train` is then a no-op."""
    if not final.is_file():
        return False
    state = load_checkpoint(final)
    if state.get("run_key") != key:  # the key covers the signature
        log.info("%s: trained with other knobs; training this configuration", final)
        return False
    check_signature(final, state.get("signature"), signature)
    done = int(state["step"])
    if done >= steps:
        log.info("%s: already trained to step %d; nothing to do", final, done)
        return True
    return False


def prepare_outputs(out: Path, ckpts: Checkpoints) -> None:
    """Before any compute: the train folder and the checkpoint store are writable folders."""
    from vmddpm.io import ensure_writable

    ensure_writable(out, ckpts.folder)


def save_final(out: Path, ckpts: Checkpoints, full: dict[str, Any], final: dict[str, Any]) -> Path:
    """The end of a run: its full state as the store's newest checkpoint and as `last.pt` of the train
    folder (a copy), then `model.pt`. Returns the path of `model.pt`."""
    path = ckpts.save(full)
    copy_file(path, out / LAST)
    save_checkpoint(out / FINAL, {**final, "run_key": ckpts.key, "knobs": ckpts.knobs})
    return out / FINAL


# -------------------------------------------------------------------------------------------- data order
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


def require_prepared(cfg: Config, dataset: str) -> Path:
    """The prepared dataset's folder; a one-line UserError when it has no manifest."""
    folder = cfg.prepared_dir(dataset)
    if not folder.is_dir() or not (folder / MANIFEST).is_file():
        raise UserError(
            f"{folder}: no prepared dataset (manifest.csv missing); "
            f"run `vmddpm prepare --dataset {dataset}` first"
        )
    return folder


def load_training_split(cfg: Config, dataset: str) -> Dataset:
    """The training split of a prepared dataset, as (1, H, W) float tensors in [-1, 1]."""
    folder = require_prepared(cfg, dataset)
    manifest = folder / MANIFEST
    from vmddpm.data.dataset import SliceDataset

    ds = SliceDataset(folder, split="train", image_size=cfg.data.image_size, hflip=False)
    if len(ds) == 0:
        raise UserError(
            f"{manifest}: no training slices (split == train); rerun `vmddpm prepare --dataset {dataset}`"
        )
    return ds


def make_loader(
    data: Dataset, sampler: EpochSampler, batch_size: int, num_workers: int, seed: int, pin_memory: bool
) -> DataLoader:
    """The training DataLoader: order from `sampler`, its own generator (the global RNG is untouched)."""
    return DataLoader(
        data,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=False,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
    )


def batch_images(batch: Any) -> torch.Tensor:
    """The image tensor of a DataLoader batch (a tensor, a tuple whose first item it is, or a dict)."""
    if isinstance(batch, (list, tuple)):
        batch = batch[0]
    if isinstance(batch, dict):
        batch = batch["image"]
    return batch


def hflip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mirror each image with probability 1/2, the coin from `gen` (the run's checkpointed generator)."""
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    return torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)


# ------------------------------------------------------------------------------------------- optimisers
def repack_adam_state(saved: dict[str, Any], counts: Sequence[int]) -> dict[str, Any]:
    """An Adam(W) state dict saved when the parameters were split finer, for the current parameters:
    `counts[i]` consecutive saved tensors make current parameter i (flattened and concatenated in
    order, as `vmddpm/ops/ss2d_layout.py` packs an SS2D block). Checkpoints written before the CSM
    block's weights were packed thereby resume where they stopped, moments and all. A state of any
    other shape is returned unchanged (load_state_dict then says what does not fit)."""
    groups = saved.get("param_groups", [])
    if len(groups) != 1 or len(groups[0]["params"]) != sum(counts) or len(counts) == sum(counts):
        return saved
    ids, old = groups[0]["params"], saved.get("state", {})
    state: dict[int, Any] = {}
    at = 0
    for i, count in enumerate(counts):
        parts = [old.get(pid) for pid in ids[at : at + count]]
        at += count
        if any(p is None for p in parts):
            continue  # no state yet (the first step had not run): the optimizer starts it
        if count == 1:
            state[i] = parts[0]
            continue
        state[i] = {
            key: parts[0][key].clone() if key == "step" else torch.cat([p[key].reshape(-1) for p in parts])
            for key in parts[0]
        }
    return {"state": state, "param_groups": [{**groups[0], "params": list(range(len(counts)))}]}


class RepackingOptimizer:
    """`load_state_dict` of an optimizer through `repack_adam_state` (what `resume` loads into)."""

    def __init__(self, optimizer: torch.optim.Optimizer, counts: Sequence[int]) -> None:
        self.optimizer, self.counts = optimizer, list(counts)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(repack_adam_state(state, self.counts))


def adam(
    params: Any,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    decoupled: bool,
) -> torch.optim.Optimizer:
    """AdamW (`decoupled`, the diffusion trainer) or Adam (the GANs), fused: one kernel over every
    parameter instead of ~20 small ops per parameter tensor. On CPU that is 3.5-6x faster per step
    (51M-parameter paper VM-DDPM: 38 against 133 ms; demo: 1.4 against 8.9 ms) and it removes two
    thirds of a training step's dispatcher ops (VM-DDPM has 842 parameter tensors); it is
    deterministic, and on CUDA it is the fastest implementation as well."""
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    return cls(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)


# --------------------------------------------------------------------------------------------------- EMA
def make_ema(net: nn.Module, decay: float) -> AveragedModel:
    return AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


@torch.no_grad()
def update_ema(ema: AveragedModel, net: nn.Module, step: int, warmup_steps: int) -> None:
    """EMA step; during `train.ema_warmup_steps` the EMA copies the weights exactly instead."""
    if step <= warmup_steps:
        for pe, p in zip(ema.module.state_dict().values(), net.state_dict().values(), strict=True):
            pe.copy_(p)
    else:
        ema.update_parameters(net)


# ----------------------------------------------------------------------------------------------- history
def write_history(path: Path, rows: list[dict[str, float]], fields: Sequence[str] = HISTORY_FIELDS) -> None:
    """history.csv, atomically: one row per logged step (`loss` is what the run minimises)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields))
    w.writeheader()
    w.writerows(rows)
    write_text(path, buf.getvalue())


def close_run(run: Any, cfg: Config, dataset: str, model: str, final: Path, ema: nn.Module) -> None:
    """The end of every train run: tag the final checkpoint (a path relative to the project), attach the
    history, log the EMA network as the run's MLflow model (registered as
    `<experiment>-<dataset>-<model>`) and note the run in the train folder (`contracts.TRAIN_RUN`), where
    sample, sweep and evaluate runs find the run they descend from."""
    out = final.parent
    where = os.path.relpath(final, cfg.root)
    run.set_tags({"checkpoint": where})
    run.log_artifact(out / HISTORY)
    write_text(out / "checkpoint.txt", f"{where}\n")
    run.log_artifact(out / "checkpoint.txt")
    if run.run_id is None:  # tracking off: no run to link to
        (out / TRAIN_RUN).unlink(missing_ok=True)
        return
    model_id = run.log_model(
        ema,
        name="ema",
        registered_name=f"{cfg.tracking.experiment}-{dataset}-{model}",
        tags={"dataset": dataset, "model": model, "family": cfg.preset(model).family, "checkpoint": where},
    )
    write_text(out / TRAIN_RUN, json.dumps({"run_id": run.run_id, "model_id": model_id}) + "\n")


# ---------------------------------------------------------------------------------------- trained model
def load_trained(cfg: Config, dataset: str, model: str, use_ema: bool) -> tuple[nn.Module, dict[str, Any]]:
    """The trained network of `model.pt` (EMA or raw weights) in eval mode on CPU, and the checkpoint:
    the diffusion network, or for the gan family the generator. The signature of the checkpoint must
    match the configured model."""
    from vmddpm.nn.registry import build_gan, build_model, model_signature

    path = cfg.train_dir(dataset, model) / FINAL
    if not path.is_file():
        raise UserError(
            f"{path}: no trained model; run `vmddpm train --dataset {dataset} --model {model}` first"
        )
    state = load_checkpoint(path, expect=model_signature(cfg, model))
    net = build_gan(cfg, model)[0] if cfg.preset(model).family == "gan" else build_model(cfg, model)
    net.load_state_dict(state["ema" if use_ema else "model"])
    return net.eval(), state
