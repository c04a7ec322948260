"""The lean VM-DDPM network on CPU: dispatcher ops, bytes allocated and step time per training step,
each ratio measured side by side in one process.

Groups (each in a fresh process at `--threads` threads, default one, as the figures of the
lean-network issue were taken):
- `paper64`: the paper-sized networks (top-level groups of params.yaml) at 64^2, batch 2: vmddpm
  vs unet_attn (the attention U-Net it must beat).
- `demo32`: the demo-sized networks (`scales.demo`) at 32^2, batch 8: vmddpm vs vmddpm_cnn_only
  (the same U-Net without its S6 path: what the CSM costs on top).

Per model and group:
- `aten_ops`, `copy_ops`: every `aten::` event (nested ones included) of one training step under
  torch.profiler, and how many of them are `aten::copy_`; also split into the network's forward +
  backward (`net_*`) and the optimizer step, so a change of optimizer does not hide in the ratio.
- `alloc_bytes`: the sum of every allocation made during the step (profile_memory, each event's
  own allocations): the memory traffic of the step, not its peak.
- `step_s` / `user_s`: medians of the wall and user-CPU time per step over `--rounds` rounds in
  which the models of the group alternate (a, b, a, b, ...), so the machine's drift hits both.
The step is `_measure.denoiser_step` (forward, MSE to the noise, backward, the trainer's AdamW).

`--baseline COMMIT` also runs every group on `git archive COMMIT` (imported through PYTHONPATH in a
subprocess, at the same time as the current tree's groups) and records it as `baseline`, so a
before/after comparison comes from one run on one machine. It also compares the two trees' networks
on the same weights (each model freshly built from seed 0, one fixed batch, fp32, no grad):
`outputs_vs_baseline` holds the largest absolute and relative differences per group and model, and
whether every element agrees within 1e-5 (|a - b| <= 1e-5 + 1e-5 |b|).

Writes `results/benchmarks/lean.json` atomically. Run from the repository root:
    .venv/bin/python benchmarks/bench_lean.py --baseline b1fb54a
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from _measure import command_line, denoiser_step, interleaved_steps, loadavg, machine_info, set_threads

log = logging.getLogger("bench_lean")
ROOT = Path(__file__).resolve().parents[1]
GROUPS: dict[str, dict[str, Any]] = {
    "paper64": {"scale": "paper", "size": 64, "batch": 2, "models": ["vmddpm", "unet_attn"]},
    "demo32": {"scale": "demo", "size": 32, "batch": 8, "models": ["vmddpm", "vmddpm_cnn_only"]},
}
TARGETS = {
    "paper64": {"aten_ops": 2.0, "alloc_bytes": 2.0, "step_s": 3.0},
    "demo32": {"step_s": 2.5},
}
"""The lean-network issue's acceptance ratios (first model / second model of the group)."""


def _count(events: Any) -> dict[str, int]:
    names = collections.Counter(e.name for e in events if e.name.startswith("aten::"))
    alloc = sum(max(int(e.self_cpu_memory_usage), 0) for e in events)
    return {"aten_ops": sum(names.values()), "copy_ops": names["aten::copy_"], "alloc_bytes": alloc}


def _profile(fn: Any) -> dict[str, int]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return _count(prof.events())


OUTPUT_TOL = 1e-5
"""The lean-network issue's equivalence tolerance for the whole network (fp32)."""


def _fresh_output(net: Any, size: int, batch: int) -> Any:
    """A copy of the fresh network's output on a fixed batch, the same in every tree: parameters that
    start at zero (the output conv, LayerNorm biases) are first drawn by name, or every network
    would output zeros and agree trivially."""
    import copy

    import torch

    net = copy.deepcopy(net)
    state = net.state_dict()  # VMamba's names in every tree (vmddpm/nn/scan2d.py)
    g = torch.Generator().manual_seed(2)
    for name in sorted(state):
        if state[name].is_floating_point() and not state[name].any():
            state[name] = torch.randn(state[name].shape, generator=g) * 0.1
    net.load_state_dict(state)
    x = torch.randn(batch, 1, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    with torch.no_grad():
        return net(x, t)


def measure_group(
    group: str, params: str, rounds: int, threads: int, dump: str | None = None
) -> dict[str, Any]:
    """One group in this (fresh) process: op counts, allocations and interleaved step times; with
    `dump`, each fresh network's output on a fixed batch is saved there for the tree comparison."""
    set_threads(threads)
    import torch

    from vmddpm.config import load_config
    from vmddpm.nn.registry import build_model

    spec = GROUPS[group]
    cfg = load_config(params, scale=spec["scale"])
    out: dict[str, Any] = {"group": group, **spec, "models_measured": {}}
    steps = {}
    for name in spec["models"]:
        torch.manual_seed(0)
        net = build_model(cfg, name, spec["size"])
        if dump:
            torch.save(_fresh_output(net, spec["size"], spec["batch"]), Path(dump) / f"{group}-{name}.pt")
        step = denoiser_step(net, spec["batch"], spec["size"], "cpu")
        for _ in range(2):  # optimizer state, kernels compiled/loaded, allocator warm
            step()
        x = torch.randn(spec["batch"], 1, spec["size"], spec["size"])
        t = torch.randint(0, 1000, (spec["batch"],))

        def fwd_bwd(net: Any = net, x: Any = x, t: Any = t) -> None:
            net(x, t).pow(2).mean().backward()

        whole, net_only = _profile(step), _profile(fwd_bwd)
        net.zero_grad(set_to_none=True)
        out["models_measured"][name] = {
            **whole,
            **{f"net_{k}": v for k, v in net_only.items()},
            "params": sum(p.numel() for p in net.parameters()),
            "param_tensors": len(list(net.parameters())),
            "scan_backend": str(getattr(net, "resolved_scan_backend", lambda: "none")()),
        }
        steps[name] = step
    timed = interleaved_steps(steps, warmup=1, rounds=rounds, budget_s=600.0)
    for name, t_ in timed.items():
        out["models_measured"][name].update(step_s=t_["step_s_median"], user_s=t_["user_s_median"])
    a, b = spec["models"]
    ma, mb = out["models_measured"][a], out["models_measured"][b]
    keys = ("aten_ops", "copy_ops", "alloc_bytes", "net_aten_ops", "net_alloc_bytes", "step_s", "user_s")
    out["ratio"] = {k: ma[k] / mb[k] for k in keys if mb.get(k)}
    out["targets"] = TARGETS.get(group, {})
    out["meets_targets"] = {k: out["ratio"][k] <= v for k, v in out["targets"].items()}
    out["loadavg_after"] = loadavg()
    return out


def _baseline_tree(commit: str, dest: Path) -> Path:
    """`git archive COMMIT` unpacked under `dest` (the package and its params.yaml)."""
    archive = dest / "tree.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), commit], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest / "tree", filter="data")
    return dest / "tree"


def _spawn(group: str, tree: Path, rounds: int, threads: int, dump: Path | None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--point", group, "--params", str(tree / "params.yaml")]
    cmd += ["--rounds", str(rounds), "--threads", str(threads)]
    if dump:  # only a --baseline run compares the trees' outputs
        cmd += ["--dump", str(dump)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)


def _compare_outputs(group: str, dumps: dict[str, Any]) -> dict[str, Any]:
    """Per model of `group`: how far the current tree's fresh output is from the baseline's."""
    import torch

    out = {}
    for name in GROUPS[group]["models"]:
        a, b = (
            torch.load(dumps[k] / f"{group}-{name}.pt", weights_only=True) for k in ("current", "baseline")
        )
        diff = (a - b).abs()
        out[name] = {
            "max_abs_diff": float(diff.max()),
            "max_rel_diff": float(diff.max() / b.abs().max().clamp_min(1e-30)),
            "output_max_abs": float(b.abs().max()),
            f"within_{OUTPUT_TOL:g}": bool((diff <= OUTPUT_TOL + OUTPUT_TOL * b.abs()).all()),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS))
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timed rounds per group")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--baseline", metavar="COMMIT", help="also measure this commit, for before/after")
    parser.add_argument("--out", default=str(ROOT / "results" / "benchmarks" / "lean.json"))
    parser.add_argument("--point", help=argparse.SUPPRESS)  # one group in this process, JSON to stdout
    parser.add_argument("--dump", help=argparse.SUPPRESS)  # where --point saves the fresh outputs
    args = parser.parse_args(argv)
    if args.point:
        print(json.dumps(measure_group(args.point, args.params, args.rounds, args.threads, args.dump)))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    result: dict[str, Any] = {
        "command": command_line(),
        "machine": machine_info(args.threads, "cpu"),
        "loadavg_before": loadavg(),
        "method": __doc__.split("\n\n", 2)[1],
    }
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"current": ROOT}
        if args.baseline:
            trees["baseline"] = _baseline_tree(args.baseline, Path(tmp))
            result["baseline_commit"] = args.baseline
        dumps: dict[str, Path | None] = {k: None for k in trees}
        if args.baseline:
            dumps = {k: Path(tmp) / f"outputs-{k}" for k in trees}
            for d in dumps.values():
                d.mkdir()
        for group in args.groups:
            # current and baseline of a group run at the same time, so they share the machine's state
            procs = {k: _spawn(group, tree, args.rounds, args.threads, dumps[k]) for k, tree in trees.items()}
            for key, proc in procs.items():
                stdout, _ = proc.communicate()
                if proc.returncode:
                    raise SystemExit(
                        f"bench_lean: group {group} ({key}) failed with exit code {proc.returncode}"
                    )
                result.setdefault(key, {})[group] = json.loads(stdout.strip().splitlines()[-1])
                log.info("%s %s: ratios %s", key, group, result[key][group]["ratio"])
            if args.baseline:
                result.setdefault("outputs_vs_baseline", {})[group] = _compare_outputs(group, dumps)
                log.info("%s outputs vs baseline: %s", group, result["outputs_vs_baseline"][group])
    from vmddpm.io import write_text

    write_text(Path(args.out), json.dumps(result, indent=1) + "\n")
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
