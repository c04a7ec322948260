# Shared set-up. Snakemake's `config` is params.yaml (the `configfile:` below) deep-merged with any
# `--configfile` and `--config` the user gives: every key can be overridden, the matrix (`datasets`,
# `models`) included. That merged document is checked by the JSON schema (generated from
# vmddpm/config.py's models), then resolved (scale overlay) and validated by the same typed module the
# CLI uses, so a bad value is the CLI's one-line error. What differs from params.yaml reaches every job
# as `vmddpm --set KEY=VALUE`; a job's rerun trigger is only its `knobs` param, the knobs it reads
# (vmddpm.pipeline.STAGE_PARAMS, which dvc.yaml is generated from).
import os
import shlex
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.utils import min_version, validate

from vmddpm.config import ConfigError, load_config, read_yaml
from vmddpm.pipeline import SYNC_MARKER, dvc_yaml_is_current, set_overrides, stage_params
from vmddpm.contracts import SCALING_BENCHMARK, samples_grid_path, samples_meta_path

min_version("9.0")


configfile: "params.yaml"


PARAMS = "params.yaml"
# The repository root, for the conda environments (envs/*.yaml install it from ${VMDDPM_ROOT}): Snakemake
# copies them under .snakemake/conda/ before creating them, so they cannot name it by a relative path.
os.environ["VMDDPM_ROOT"] = str(Path(workflow.basedir).resolve().parent)


envvars:
    "VMDDPM_ROOT",


try:  # the typed check first: its errors are one line, naming the key and the nearest valid one
    CFG = load_config(PARAMS, document=config)
    OVERRIDES = set_overrides(load_config(PARAMS, scale=CFG.scale), CFG)
except ConfigError as e:
    where = PARAMS if config == read_yaml(Path(PARAMS)) else f"{PARAMS} + --config/--configfile"
    raise WorkflowError(str(e).replace(f"{PARAMS}:", f"{where}:", 1))
validate(config, "../schemas/params.schema.yaml")  # the workflow catalog's convention; agrees with it

SCALE = CFG.scale
# demo and paper share data/, runs/, results/ and logs/; the showcase overlay moves data, runs and results
# to showcase/ (scales.showcase.paths), and its logs go to logs/showcase/: neither clobbers the other.
LOGS = "logs" if SCALE in ("demo", "paper") else f"logs/{SCALE}"


def logs(path):
    """A log or benchmark file of this scale's run (under LOGS)."""
    return f"{LOGS}/{path}"

DATASETS = list(CFG.datasets)
MODELS = list(CFG.models)
CLI_ARGS = " ".join(["--params", PARAMS, "--scale", SCALE, *(f"--set {shlex.quote(o)}" for o in OVERRIDES)])
CLI = f"vmddpm {CLI_ARGS}"
if OVERRIDES:
    logger.info(f"vmddpm: --config/--configfile override {len(OVERRIDES)} knob(s) of {PARAMS}: " + ", ".join(OVERRIDES))
if not OVERRIDES and Path(".dvc").is_dir() and (stale := dvc_yaml_is_current(PARAMS)):
    logger.warning(f"vmddpm: {stale}")


def cli(wildcards, output):
    """The rule's `vmddpm` prefix, with the --config/--configfile overrides. It takes `output` on purpose:
    Snakemake treats such a param as derived, so it is no rerun trigger; the `knobs` param is (the knobs
    the job reads), and a change of a knob the job does not read must not rerun it."""
    return CLI


def rel(path):
    """A path of vmddpm.config as Snakemake wants it: relative to the working directory."""
    return os.path.relpath(path)


def raw(dataset):
    return rel(CFG.raw_dir(dataset))


def prepared(dataset):
    return rel(CFG.prepared_dir(dataset))


def train_dir(dataset, model):
    return rel(CFG.train_dir(dataset, model))


def samples_dir(dataset, model):
    return rel(CFG.samples_dir(dataset, model))


def samples_meta(dataset, model):
    return rel(samples_meta_path(CFG.samples_dir(dataset, model)))


def samples_grid(dataset, model):
    return rel(samples_grid_path(CFG.samples_dir(dataset, model)))


def metrics(dataset, model):
    return rel(CFG.metrics_path(dataset, model))


def protocol(dataset, model):
    return rel(CFG.protocol_path(dataset, model))


def sweep_json(dataset, model):
    return rel(CFG.sweep_path(dataset, model))


def sweep_dir(dataset, model):
    return rel(CFG.sweep_dir(dataset, model))


def knobs(stage):
    """The resolved knobs a job of `stage` reads (vmddpm.pipeline.STAGE_PARAMS); a change to any of them
    reruns exactly the affected jobs."""
    return lambda w: stage_params(CFG, stage, dataset=w.get("dataset"), model=w.get("model"))


def gpu(n):
    """GPU resources only at paper scale; the demo never asks a cluster for a GPU."""
    return n if SCALE == "paper" else 0


TRAIN_MINUTES = {"paper": 2880, "showcase": 120}.get(SCALE, 30)
"""A train job's time limit on a cluster (minutes): the showcase trains ~40 min on one core."""


REPORT_TABLES = {
    name: rel(CFG.results_dir("tables", name))
    for name in ("main.html", "ablation.html", "main.md", "main.csv", "ablation.md", "ablation.csv")
}
CLAIMS = rel(CFG.results_dir("tables", "claims.json"))
SUMMARY = rel(CFG.results_dir("tables", "summary.json"))
REPORT_OUTPUTS = [*REPORT_TABLES.values(), CLAIMS, SUMMARY]
FIGURES = rel(CFG.results_dir("figures"))
SCALING = rel(CFG.results_dir(*SCALING_BENCHMARK.split("/")))
REFERENCE = rel(CFG.results_dir("paper", "reference.csv"))
DVC_DONE = SYNC_MARKER if LOGS == "logs" else f"{LOGS}/dvc_commit.done"
# dvc.lock records params.yaml's values: with --config/--configfile overrides, or at another scale than
# params.yaml's `scale:` (e.g. `--config scale=showcase`), the outputs were made with other values, so the
# last rule does not `dvc commit` them (it says so in its log).
PARAMS_SCALE = read_yaml(Path(PARAMS)).get("scale")
DVC_COMMIT = not OVERRIDES and SCALE == PARAMS_SCALE
# The report's committed inputs (the paper's numbers, the scaling benchmark) live under params.yaml's
# top-level paths.results (results/); a scale whose overlay moves paths.results (showcase) reads copies.
HOME_RESULTS = rel(CFG.root / config["paths"]["results"])
MOVED_RESULTS = rel(CFG.results_dir()) != HOME_RESULTS
