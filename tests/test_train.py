"""vmddpm.stages.train and vmddpm.trainkit: loss falls, kill-and-resume is bit-identical, DDP ranks agree,
bad inputs give one-line errors, a failed write never destroys the last good checkpoint."""

from __future__ import annotations

import csv
import io
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import ONE_THREAD_ENV, TINY, kill_and_resume, step_files
from vmddpm.errors import UserError
from vmddpm.nn.scan2d import SS2D, unpacked_param_counts
from vmddpm.runtime import state_hash
from vmddpm.stages.train import train
from vmddpm.trainkit import (
    Checkpoints,
    EpochSampler,
    RepackingOptimizer,
    adam,
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    resume,
    save_checkpoint,
)

DATASET, MODEL = "acdc", "vmddpm"
pytestmark = pytest.mark.usefixtures("one_thread")


def write_prepared(folder: Path, n: int = 12, size: int = 16, n_test: int = 3) -> Path:
    """A prepared dataset in the data stage's format: PNG slices + manifest.csv (file, subject, split,
    source, slice). Images are bright discs on a dark background at seeded random places."""
    (folder / "slices").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    rows = []
    for i in range(n):
        cx, cy = rng.uniform(size * 0.25, size * 0.75, 2)
        r = rng.uniform(size * 0.15, size * 0.3)
        img = np.where((xx - cx) ** 2 + (yy - cy) ** 2 < r * r, 220, 30).astype(np.uint8)
        name = f"slices/s{i // 3:03d}_{i % 3:03d}.png"
        Image.fromarray(img, mode="L").save(folder / name)
        split = "test" if i >= n - n_test else "train"
        rows.append(
            {"file": name, "subject": f"s{i // 3:03d}", "split": split, "source": "phantom", "slice": i % 3}
        )
    with (folder / "manifest.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["file", "subject", "split", "source", "slice"])
        w.writeheader()
        w.writerows(rows)
    return folder


def tiny_cfg(make_cfg, *extra: str):
    cfg = make_cfg(*TINY, *extra)
    if not (cfg.prepared_dir(DATASET) / "manifest.csv").exists():
        write_prepared(cfg.prepared_dir(DATASET), size=cfg.data.image_size)
    return cfg


def cli_args(*extra: str) -> list[str]:
    out = ["train", "--dataset", DATASET, "--model", MODEL]
    for item in (*TINY, *extra):
        out += ["--set", item]
    return out


def weights_hash(path: Path) -> tuple[str, str]:
    state = torch.load(path, weights_only=True)
    return state_hash(state["model"]), state_hash(state["ema"])


# ------------------------------------------------------------------------------------- acceptance
@pytest.mark.slow
def test_loss_falls_over_200_steps(make_cfg) -> None:
    cfg = tiny_cfg(
        make_cfg, "train.steps=200", "train.log_every=1", "train.lr=0.001", "train.checkpoint_every=1000"
    )
    out = train(cfg, DATASET, MODEL)
    with (out / "history.csv").open() as fh:
        loss = [float(r["loss"]) for r in csv.DictReader(fh)]
    assert len(loss) == 200
    first, last = np.mean(loss[:20]), np.mean(loss[-20:])
    assert last < 0.7 * first, (first, last)
    state = load_checkpoint(out / "model.pt")
    assert state["step"] == 200 and state["signature"]["family"] == "vmunet"


def test_finished_run_is_a_noop_and_extends(make_cfg) -> None:
    cfg = tiny_cfg(make_cfg, "train.steps=4", "train.checkpoint_every=2")
    out = train(cfg, DATASET, MODEL)
    stamp = (out / "model.pt").stat().st_mtime_ns, (out / "last.pt").stat().st_mtime_ns
    train(cfg, DATASET, MODEL)
    assert ((out / "model.pt").stat().st_mtime_ns, (out / "last.pt").stat().st_mtime_ns) == stamp
    cfg6 = make_cfg(*TINY, "train.steps=6", "train.checkpoint_every=2")
    train(cfg6, DATASET, MODEL)  # more steps asked: resumes from step 4
    assert load_checkpoint(out / "model.pt")["step"] == 6
    full = load_checkpoint(out / "last.pt")
    for key in (
        "model",
        "ema",
        "optimizer",
        "scaler",
        "lr_scheduler",
        "step",
        "rng",
        "noise_rng",
        "sampler",
        "config",
        "signature",
        "version",
        "scan_backend",
    ):
        assert key in full
    assert full["config"]["train"]["steps"] == 6 and full["sampler"]["world"] == 1


def test_sigkill_and_resume_is_bit_identical(tmp_path: Path) -> None:
    steps = ("train.steps=20", "train.checkpoint_every=4", "train.deterministic=true", "train.log_every=4")
    straight, train_dir = kill_and_resume(
        tmp_path,
        cli_args(*steps),
        lambda root: write_prepared(root / "data" / "prepared" / DATASET),
        f"runs/{DATASET}/{MODEL}/train",
        max_step=20,
    )
    assert weights_hash(train_dir / "model.pt") == weights_hash(straight / "model.pt")
    a, b = load_checkpoint(train_dir / "last.pt"), load_checkpoint(straight / "last.pt")
    assert a["history"] == [] or [r["loss"] for r in a["history"]] == [r["loss"] for r in b["history"]]
    assert state_hash({str(k): v for k, v in enumerate(_flat(a["optimizer"]))}) == state_hash(
        {str(k): v for k, v in enumerate(_flat(b["optimizer"]))}
    )


def _flat(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in _flat(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _flat(v)]
    return [torch.tensor(float(obj))] if isinstance(obj, (int, float)) else []


def test_torchrun_two_ranks_hold_identical_weights(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text((Path(__file__).parents[1] / "params.yaml").read_text())
    write_prepared(tmp_path / "data" / "prepared" / DATASET)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "vmddpm",
        *cli_args("train.steps=20", "train.checkpoint_every=10", "train.log_every=5"),
    ]
    proc = subprocess.run(
        cmd, cwd=tmp_path, env={**os.environ, **ONE_THREAD_ENV}, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(tmp_path / "runs" / DATASET / MODEL / "train" / "model.pt", weights_only=True)
    assert state["step"] == 20
    hashes = state["rank_hashes"]  # every rank's own weight hash, gathered at the end
    assert len(hashes) == 2 and hashes[0] == hashes[1] == state_hash(state["model"])
    last = torch.load(tmp_path / "runs" / DATASET / MODEL / "train" / "last.pt", weights_only=True)
    assert last["sampler"]["world"] == 2 and len(last["noise_rng"]) == 2
    assert not torch.equal(last["noise_rng"][0], last["noise_rng"][1])  # per-rank noise streams


# ------------------------------------------------------------------------------------- bad inputs
def test_empty_dataset_dir_is_a_user_error(make_cfg, cli, tmp_path: Path) -> None:
    cfg = make_cfg(*TINY)
    cfg.prepared_dir(DATASET).mkdir(parents=True)
    with pytest.raises(UserError, match=r"prepared.*vmddpm prepare"):
        train(cfg, DATASET, MODEL)
    proc = cli(*cli_args(), cwd=tmp_path, check=False, env=ONE_THREAD_ENV)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(cfg.prepared_dir(DATASET)) in lines[0]
    # the suggested command keeps the user's flags: `vmddpm --params ... --set ... prepare --dataset acdc`
    assert "`vmddpm --set data.image_size=16 " in lines[0] and " prepare --dataset acdc` first" in lines[0]


def test_manifest_without_train_rows_is_a_user_error(make_cfg) -> None:
    cfg = make_cfg(*TINY)
    write_prepared(cfg.prepared_dir(DATASET), n=3, n_test=3)
    with pytest.raises(UserError, match=r"manifest\.csv"):
        train(cfg, DATASET, MODEL)


def test_corrupt_newest_checkpoint_falls_back_to_the_newest_that_loads(make_cfg, caplog) -> None:
    caplog.set_level(logging.INFO)
    cfg = tiny_cfg(make_cfg, "train.steps=3", "train.checkpoint_every=1", "train.keep_checkpoints=3")
    out = train(cfg, DATASET, MODEL)
    store = step_files(out)
    assert [p.name for p in store] == ["step_00000001.pt", "step_00000002.pt", "step_00000003.pt"]
    (out / "model.pt").unlink()
    (out / "last.pt").unlink()
    newest = store[-1]
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    cfg4 = make_cfg(*TINY, "train.steps=4", "train.checkpoint_every=1", "train.keep_checkpoints=3")
    train(cfg4, DATASET, MODEL)
    warned = [
        r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "corrupt" in r.getMessage()
    ]
    assert len(warned) == 1 and "step_00000003.pt" in warned[0] and "falling back" in warned[0]
    assert any("step 2)" in r.getMessage() for r in caplog.records)  # resumed from the one before
    assert newest.with_name(newest.name + ".corrupt").is_file()  # kept for inspection, out of rotation
    assert load_checkpoint(out / "model.pt")["step"] == 4


def test_other_knobs_train_beside_the_kept_checkpoints(make_cfg, caplog) -> None:
    """Changed model knobs never resume (or silently mix with) another configuration's checkpoint: they
    train from step 0 under their own run key, the old run is kept, and one warning names the knobs."""
    cfg = tiny_cfg(make_cfg, "train.steps=2", "train.checkpoint_every=1")
    out = train(cfg, DATASET, MODEL)
    old = {p: p.read_bytes() for p in step_files(out)}
    other = make_cfg(*TINY, "train.steps=2", "model.base_channels=16", "model.d_state=8")
    train(other, DATASET, MODEL)
    warned = [r.getMessage() for r in caplog.records if "no checkpoint for these knobs" in r.getMessage()]
    assert len(warned) == 1
    assert "model.base_channels 8 -> 16" in warned[0] and "model.d_state 4 -> 8" in warned[0]
    assert "channel_mult" not in warned[0]  # only the knobs that differ are named
    assert all(p.read_bytes() == data for p, data in old.items())  # the other run's checkpoints kept
    assert load_checkpoint(out / "model.pt")["signature"]["base_channels"] == 16


def test_failed_write_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1, "w": torch.arange(4.0)})
    before = path.read_bytes()

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full (simulated serialisation failure)")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(1000), "bad": Unpicklable()})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file left behind
    assert load_checkpoint(path)["step"] == 1


def test_killed_writer_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    """A process SIGKILLed in the middle of writing a large checkpoint leaves the old one intact."""
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1})
    before = path.read_bytes()
    code = (
        "import torch, sys; from vmddpm.trainkit import save_checkpoint; print('go', flush=True); "
        f"save_checkpoint({str(path)!r}, {{'step': 2, 'w': [torch.randn(4_000_000) for _ in range(40)]}})"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "go"
    deadline = time.time() + 60
    while not any(p.name.startswith(".last.pt") for p in tmp_path.iterdir()) and time.time() < deadline:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert path.read_bytes() == before
    assert load_checkpoint(path)["step"] == 1
    assert latest_checkpoint(tmp_path) == path  # a stray temp file is never picked up


# ------------------------------------------------------------------------------------ units
def test_rng_state_roundtrip(tmp_path: Path) -> None:
    import random

    state = capture_rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3))
    save_checkpoint(tmp_path / "rng.pt", {"rng": state})
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])  # through weights_only=True
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


def test_latest_checkpoint_order(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path / "absent") is None
    assert latest_checkpoint(tmp_path) is None
    for name in ("last.pt", "step_00000002.pt", "step_00000010.pt", ".step_00000099.pt.tmp.pt"):
        (tmp_path / name).write_bytes(b"x")
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000010.pt"


def test_epoch_sampler_resumes_mid_epoch_and_shards() -> None:
    full = EpochSampler(10, seed=3)
    it = iter(full)
    stream = [next(it) for _ in range(25)]
    assert sorted(stream[:10]) == list(range(10)) and stream[:10] != stream[10:20]
    resumed = iter(EpochSampler(10, seed=3, start=13))
    assert [next(resumed) for _ in range(12)] == stream[13:]
    r0, r1 = iter(EpochSampler(10, 3, rank=0, world=2)), iter(EpochSampler(10, 3, rank=1, world=2))
    assert sorted([next(r0) for _ in range(5)] + [next(r1) for _ in range(5)]) == list(range(10))


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cuda_amp_training(make_cfg, amp: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cfg = tiny_cfg(
        make_cfg, "train.steps=4", "train.checkpoint_every=2", "train.device=cuda", f"train.amp={amp}"
    )
    out = train(cfg, DATASET, MODEL)
    state = load_checkpoint(out / "last.pt")
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert all(v.dtype == torch.float32 for v in state["model"].values() if v.is_floating_point())


# ---------------------------------------------------------------------------------- out of memory
def test_running_out_of_memory_is_one_line_naming_the_ways_out(make_cfg, cli, tmp_path: Path) -> None:
    """A network too large for the machine: the CPU allocator's real failure becomes one line naming
    the batch size, grad_accum, model.checkpointing and the scan backend, and nothing is written."""
    cfg = tiny_cfg(make_cfg)
    proc = cli(*cli_args("model.base_channels=3000000"), cwd=tmp_path, check=False, env=ONE_THREAD_ENV)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for word in (
        "ran out of memory",
        "train.batch_size=4",
        "train.grad_accum=1",
        "model.checkpointing=false",
    ):
        assert word in errors[0], errors[0]
    assert not cfg.train_dir(DATASET, MODEL).exists() or not any(cfg.train_dir(DATASET, MODEL).glob("*.pt"))


def test_cuda_out_of_memory_maps_to_the_same_line() -> None:
    """On a GPU the error is torch.OutOfMemoryError; it maps to the same message, with the advice that
    fits the scan backend in use (no mamba-ssm: install it)."""
    from vmddpm.runtime import is_out_of_memory, out_of_memory

    exc = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    assert is_out_of_memory(exc) and not is_out_of_memory(RuntimeError("shape mismatch"))
    knobs = {"train.batch_size": 32, "train.grad_accum": 1, "model.checkpointing": False}
    err = out_of_memory("train", torch.device("cuda", 0), knobs, "pscan")
    msg = str(err)
    assert "\n" not in msg and msg.startswith("train: cuda:0 ran out of memory")
    assert "train.batch_size=32" in msg and "model.checkpointing=true" in msg and "mamba-ssm" in msg
    assert "mamba-ssm" not in str(
        out_of_memory("sample", torch.device("cuda"), {"sample.batch_size": 64}, "cuda")
    )


def test_resume_refuses_an_optimizer_state_of_another_parameter_layout(tmp_path: Path) -> None:
    """A checkpoint whose optimizer state was written for other parameter tensors (e.g. by a vmddpm
    before the CSM block's weights were packed into one tensor) is one line naming it and the fix,
    not torch's ValueError from deep inside the resume."""
    ckpts = Checkpoints(tmp_path / "checkpoints", {"lr": 1e-4}, keep=2)
    signature = {"model": "vmddpm"}
    old = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))])
    path = ckpts.save(
        {
            "step": 5,
            "signature": signature,
            "opt": old.state_dict(),
            "rng": capture_rng_state(),
            "noise_rng": [],
        }
    )
    new = torch.optim.AdamW([torch.nn.Parameter(torch.ones(5))])
    with pytest.raises(UserError, match=r"its 'opt' state does not fit this network") as err:
        resume(ckpts, tmp_path / "last.pt", signature, {"opt": new}, torch.Generator())
    message = str(err.value)
    assert message.startswith(str(path)) and f"delete {path.parent} to train" in message
    assert "\n" not in message


def test_an_optimizer_state_saved_before_the_csm_weights_were_packed_resumes_the_same_steps() -> None:
    """Checkpoints written when an SS2D block had eleven parameter tensors hold Adam moments per
    tensor; `RepackingOptimizer` packs them onto the block's one tensor, so the step after resuming is
    bit for bit the step the unpacked optimizer takes."""
    torch.manual_seed(0)
    block = SS2D(8, d_state=4, expand=2, d_conv=3, dt_rank="auto", sr="window", sr_window=2, sr_seed=0,
                 scan_backend="auto")  # fmt: skip
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 1), block)
    counts = unpacked_param_counts(net)
    assert counts == [1, 1, len(block.layout.shapes)]
    old = [p.detach().clone() for p in net[0].parameters()]
    old += [v.clone() for v in block.layout.views(block.weights.detach()).values()]
    old = [torch.nn.Parameter(t) for t in old]
    old_opt = adam(old, lr=1e-2, weight_decay=0.1, decoupled=True)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):  # the old run's steps, its moments as a checkpoint has them
        for p in old:
            p.grad = torch.randn(p.shape, generator=gen)
        old_opt.step()
    buf = io.BytesIO()  # through a file's bytes, as a checkpoint holds it
    torch.save(old_opt.state_dict(), buf)
    saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    with torch.no_grad():  # the new run loads the model: the same numbers, packed
        for p, o in zip(net[0].parameters(), old[:2], strict=True):
            p.copy_(o)
        block.weights.copy_(torch.cat([o.reshape(-1) for o in old[2:]]))
    new_opt = adam(net.parameters(), lr=1e-2, weight_decay=0.1, decoupled=True)
    RepackingOptimizer(new_opt, counts).load_state_dict(saved)
    grads = [torch.randn(p.shape, generator=gen) for p in old]
    for p, g in zip(old, grads, strict=True):
        p.grad = g
    old_opt.step()
    net[0].weight.grad, net[0].bias.grad = grads[0], grads[1]
    block.weights.grad = torch.cat([g.reshape(-1) for g in grads[2:]])
    new_opt.step()
    torch.testing.assert_close(
        block.weights.detach(), torch.cat([o.detach().reshape(-1) for o in old[2:]]), rtol=0, atol=0
    )
    torch.testing.assert_close(net[0].weight.detach(), old[0].detach(), rtol=0, atol=0)
    assert int(new_opt.state[block.weights]["step"]) == 3
