"""params.yaml `cpu_memory`: `retain` stops the per-step page faults of large CPU tensors, `release` keeps
glibc's behaviour, and neither changes a result. The setting is process-wide, so every case runs in a
fresh interpreter."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ONE_THREAD_ENV, ROOT, run_cli
from tests.test_train import DATASET, MODEL, cli_args, weights_hash, write_prepared
from vmddpm import cpu_memory
from vmddpm.config import ConfigError, load_config

glibc = pytest.mark.skipif(
    not cpu_memory.supported(), reason="the cpu_memory setting acts on glibc's malloc only"
)

# The set-up every compute command does with params.yaml's policy and its device type ("cuda" asked
# directly: this machine has none), then a few forward + backward passes of a small conv layer with
# 32 MiB activations (glibc's largest mmap threshold); print each pass's minor page faults. The train
# command's own use of it: test_retain_and_release_train_bit_identical_weights.
PROBE = """
import json, resource, sys
import torch
from vmddpm import cpu_memory
from vmddpm.config import load_config
cfg = load_config(sys.argv[1], overrides=[f"cpu_memory={sys.argv[2]}"])
cpu_memory.configure(cfg.cpu_memory, sys.argv[3])
torch.manual_seed(0)
torch.set_num_threads(1)
conv = torch.nn.Conv2d(1, 32, 3, padding=1)
x = torch.randn(4, 1, 256, 256)
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    conv(x).relu().square().mean().backward()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""


def _faults(params: Path, policy: str, device: str = "cpu") -> list[int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(params), policy, device],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc
def test_retain_reuses_freed_memory_instead_of_faulting_it_in_again(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    release = _faults(params, "release")
    retain = _faults(params, "retain")
    # a CUDA run leaves the host allocator as it is: only CPU computation benefits
    retain_on_cuda = _faults(params, "retain", device="cuda")
    # release: every pass maps its large activations afresh and faults each page in again;
    # retain: the first passes fault the heap in (it settles within a few), later ones reuse it
    assert sum(release[-4:]) > 10 * sum(retain[-4:]), (retain, release)
    assert sum(retain[-4:]) < retain[0], retain
    assert sum(retain_on_cuda[-4:]) > 10 * sum(retain[-4:]), (retain_on_cuda, retain)


def test_retain_and_release_train_bit_identical_weights(tmp_path: Path) -> None:
    """Speed only: the same deterministic run gives the same weights under either policy; the CLI
    says which one it applied."""
    steps = ("train.steps=6", "train.checkpoint_every=3", "train.deterministic=true")
    hashes, logs = {}, {}
    for policy in ("retain", "release"):
        root = tmp_path / policy
        root.mkdir()
        shutil.copy(ROOT / "params.yaml", root / "params.yaml")
        write_prepared(root / "data" / "prepared" / DATASET)
        proc = run_cli(*cli_args(*steps, f"cpu_memory={policy}"), cwd=root, env=ONE_THREAD_ENV)
        logs[policy] = proc.stderr
        hashes[policy] = weights_hash(root / "runs" / DATASET / MODEL / "train" / "model.pt")
    assert hashes["retain"] == hashes["release"]
    if cpu_memory.supported():
        assert "cpu_memory=retain: freed CPU memory stays in the process" in logs["retain"]
    assert "cpu_memory=retain" not in logs["release"]


def test_bad_policy_is_a_one_line_error(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    with pytest.raises(ConfigError) as exc:
        load_config(params, overrides=["cpu_memory=keep"])
    msg = str(exc.value)
    assert "\n" not in msg and "cpu_memory" in msg and "retain" in msg
    assert msg.startswith("--set cpu_memory=keep:")  # the value came from --set, not from the file
