"""The GPU benchmark runs end to end (at toy sizes on CPU), so a session lent a GPU finds a working
script; its numbers here mean nothing and are not checked, only that every part of the record is
there and consistent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ONE_THREAD_ENV

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_gpu_smoke_run_writes_every_part(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, "benchmarks/bench_gpu.py", "--device", "cpu", "--smoke", "--out", str(out)]
    proc = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, **ONE_THREAD_ENV}, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert rec["smoke"] is True and out.with_suffix(".png").stat().st_size > 1000
    presets = {p["model"]: p for p in rec["presets"]}
    assert {"vmddpm", "unet_attn", "dit"} <= set(presets) and "dcgan" not in presets
    for p in presets.values():
        assert "error" not in p, p
        assert p["train_step_s"] > 0 and p["sample_call_s"] > 0
        assert p["images_per_s"] == pytest.approx(p["batch"] / p["train_step_s"])
    assert presets["vmddpm"]["scan_backend"] == "cpu" and presets["unet_attn"]["scan_backend"] == "none"
    ops = {(r["op"], r["backend"]) for r in rec["op"]}
    assert {("csm_scan", "cpu"), ("csm_scan", "pscan"), ("selective_scan", "pscan")} <= ops
    proj = rec["projection"]
    cells = [c for c in proj["cells"] if c["model"] in presets]
    assert cells and all(c["train_h"] > 0 and c["sample_h"] > 0 for c in cells)
    assert proj["total_gpu_hours"] == pytest.approx(sum(c["train_h"] + c["sample_h"] for c in cells))


def test_bench_lean_compares_a_baseline_tree_side_by_side(tmp_path: Path) -> None:
    """`bench_lean.py --baseline`: both trees measured in one run, ratios and the networks' outputs on
    the same weights compared (HEAD against the working tree: the diff is what the checkout holds)."""
    out = tmp_path / "lean.json"
    cmd = [sys.executable, "benchmarks/bench_lean.py", "--groups", "demo32", "--rounds", "1"]
    cmd += ["--baseline", "HEAD", "--out", str(out)]
    proc = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, **ONE_THREAD_ENV}, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(out.read_text())
    for tree in ("current", "baseline"):
        group = rec[tree]["demo32"]
        assert set(group["models_measured"]) == {"vmddpm", "vmddpm_cnn_only"}
        assert group["ratio"]["step_s"] > 1 and group["meets_targets"].keys() == {"step_s"}
    for name, cmp in rec["outputs_vs_baseline"]["demo32"].items():
        # a fresh network's output on a fixed batch, zero-initialised weights drawn first: never trivially 0
        assert cmp["output_max_abs"] > 0.1, name
        assert cmp["within_1e-05"] is True and cmp["max_rel_diff"] < 1e-5, (name, cmp)
