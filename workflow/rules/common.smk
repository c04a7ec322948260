# Shared set-up: params.yaml validated by the JSON schema (generated from vmddpm/config.py's models),
# then resolved (scale overlay) by the same typed module the CLI uses, so the workflow never repeats a
# default, a path layout, a file contract (vmddpm/contracts.py) or the knobs a stage reads
# (vmddpm.pipeline.STAGE_PARAMS, which dvc.yaml lists too).
import os

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, validate

from vmddpm.config import ConfigError, load_config
from vmddpm.pipeline import stage_params
from vmddpm.contracts import SCALING_BENCHMARK, samples_grid_path, samples_meta_path

min_version("9.0")


configfile: "params.yaml"


validate(config, "../schemas/params.schema.yaml")

PARAMS = "params.yaml"
SCALE = config["scale"]  # `--config scale=paper` overrides params.yaml's `scale:`
try:
    CFG = load_config(PARAMS, scale=SCALE)
except ConfigError as e:
    raise WorkflowError(str(e))

DATASETS = list(CFG.datasets)
MODELS = list(CFG.models)
CLI = f"vmddpm --params {PARAMS} --scale {SCALE}"



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


REPORT_OUTPUTS = [
    rel(CFG.results_dir("tables", name))
    for name in ("main.md", "main.csv", "ablation.md", "ablation.csv", "summary.json")
]
FIGURES = rel(CFG.results_dir("figures"))
SCALING = rel(CFG.results_dir(*SCALING_BENCHMARK.split("/")))
REFERENCE = rel(CFG.results_dir("paper", "reference.csv"))
DVC_DONE = "logs/dvc_commit.done"
