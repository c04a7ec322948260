# Shared set-up: params.yaml validated by the JSON schema, then resolved (scale overlay) by the same
# typed module the CLI uses, so the workflow never repeats a default or a path layout.
import os

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, validate

from vmddpm.config import ConfigError, load_config

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


def metrics(dataset, model):
    return rel(CFG.metrics_path(dataset, model))


def knobs(*keys):
    """The resolved params slice of a job; a change to any of them reruns exactly the affected jobs."""
    data = CFG.to_dict()
    out = {}
    for key in keys:
        node = data
        for part in key.split("."):
            node = node[part]
        out[key] = node
    return out


def model_knobs(model):
    preset = CFG.preset(model)
    keys = {"vmunet": "model", "unet_attn": "baselines.unet_attn", "dit": "baselines.dit"}
    group = keys.get(preset.family, "baselines.gan")
    return {**knobs(group, "diffusion", "seed"), "preset": str(preset)}


def gpu(n):
    """GPU resources only at paper scale; the demo never asks a cluster for a GPU."""
    return n if SCALE == "paper" else 0


REPORT_OUTPUTS = [
    rel(CFG.results_dir("tables", name))
    for name in ("main.md", "main.csv", "ablation.md", "ablation.csv", "summary.json")
]
FIGURES = rel(CFG.results_dir("figures"))
DVC_DONE = "logs/dvc_commit.done"
