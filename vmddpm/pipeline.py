"""What the pipeline tools get from the config: the JSON schema of params.yaml and the knobs of each stage.

- `params_schema()` / `schema_yaml()`: the JSON schema (draft 2020-12) Snakemake validates params.yaml
  against at start-up, generated from the typed models of `vmddpm.config` and committed as
  `SCHEMA_FILE` (`vmddpm config schema > workflow/schemas/params.schema.yaml`; a test keeps them equal);
- `STAGE_PARAMS`: the resolved knobs each stage's outputs depend on, per kind of model, the one table
  behind the `params:` of every Snakemake rule (`stage_params()`) and of every stage of `dvc.yaml`,
  which is generated from it and params.yaml (`dvc_yaml()`, `vmddpm config dvc --write`; a test, and
  every `vmddpm` command that DVC runs, check that the committed file is current).

Torch-free: `workflow/rules/common.smk` imports it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from vmddpm.config import Config, Document, type_adapter
from vmddpm.contracts import DEFAULT_PARAMS, SCALES

# ------------------------------------------------------------------------------- the JSON schema
SCHEMA_FILE = "workflow/schemas/params.schema.yaml"
_SCHEMA_HEADER = (
    "# JSON schema of params.yaml, checked by Snakemake at start-up (before any job). GENERATED from the\n"
    "# typed models of vmddpm/config.py: do not edit; regenerate with\n"
    f"#   vmddpm config schema > {SCHEMA_FILE}\n"
    "# (tests/test_config.py fails when this file and the models differ). Cross-field rules (splits sum\n"
    "# to 1, models are presets, ...) are checked by vmddpm/config.py right after.\n"
)


def params_schema() -> dict[str, Any]:
    """The JSON schema (draft 2020-12) of params.yaml, from the models above.

    `scales.<name>` overlays and presets' `model:` overrides are *partial* groups: the same properties,
    none required (`Partial<Group>` definitions).
    """
    schema = type_adapter(Document).json_schema(ref_template="#/$defs/{model}")
    schema = _strip_titles(schema)
    defs = schema.pop("$defs")
    root = dict(schema)
    partial = {f"Partial{k}": _partial(v) for k, v in defs.items() if k != "PresetConfig"}
    partial["PartialDocument"] = _partial({k: v for k, v in root.items()})
    defs["PresetConfig"]["properties"]["model"] = {
        "anyOf": [{"$ref": "#/$defs/PartialModelConfig"}, {"type": "null"}],
        "default": None,
    }
    root["properties"]["scales"] = {
        "type": "object",
        "properties": {
            name: {"anyOf": [{"$ref": "#/$defs/PartialDocument"}, {"type": "null"}]} for name in SCALES
        },
        "additionalProperties": False,
    }
    partial["PartialDocument"]["properties"].pop("scales")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        **root,
        "description": "vmddpm params.yaml (the top-level groups; `scales.<name>` overlays are partial)",
        "$defs": {**defs, **partial},
    }


def schema_yaml() -> str:
    """`params_schema()` as the YAML text committed at `SCHEMA_FILE`."""
    return _SCHEMA_HEADER + yaml.safe_dump(params_schema(), sort_keys=False, width=110)


def _strip_titles(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_titles(v) for k, v in node.items() if k != "title" or not isinstance(v, str)}
    if isinstance(node, list):
        return [_strip_titles(v) for v in node]
    return node


def _partial(node: Any) -> Any:
    """A schema with nothing required and every `$defs` reference pointing at its partial twin."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "required":
                continue
            if (
                k == "$ref"
                and isinstance(v, str)
                and v.startswith("#/$defs/")
                and v != "#/$defs/PresetConfig"
            ):
                v = "#/$defs/Partial" + v.rsplit("/", 1)[1]
            out[k] = _partial(v)
        return out
    if isinstance(node, list):
        return [_partial(v) for v in node]
    return node


# -------------------------------------------------------------------------- the params of each stage
_EVAL_FID = (
    "eval.extractor",
    "eval.inception_weights",
    "eval.reference_split",
    "eval.n_fake",
    "eval.kid_subset_size",
    "eval.batch_size",
    "eval.device",
)
_GAN_TRAIN = (
    "train.steps",
    "train.batch_size",
    "train.ema_decay",
    "train.ema_warmup_steps",
    "train.deterministic",
    "train.checkpoint_every",
    "train.log_every",
    "train.num_workers",
    "train.device",
)
_SAMPLE_ANY = ("sample.n_images", "sample.batch_size", "sample.use_ema", "sample.seed", "sample.device")

STAGE_PARAMS: dict[str, dict[str, tuple[str, ...]]] = {
    "download": {"any": ("data.{dataset}", "data.phantoms", "data.max_unpacked_bytes")},
    "prepare": {"any": ("seed", "data.image_size", "data.split", "data.{dataset}")},
    "train": {
        "vmunet": ("seed", "data.image_size", "data.hflip", "model", "presets.{model}", "diffusion", "train"),
        "unet_attn": (
            "seed",
            "data.image_size",
            "data.hflip",
            "baselines.unet_attn",
            "presets.{model}",
            "diffusion",
            "train",
        ),
        "dit": (
            "seed",
            "data.image_size",
            "data.hflip",
            "baselines.dit",
            "presets.{model}",
            "diffusion",
            "train",
        ),
        "gan": ("seed", "data.image_size", "data.hflip", "baselines.gan", "presets.{model}", *_GAN_TRAIN),
    },
    "sample": {
        "diffusion": ("sample", "diffusion", "eval.reference_split"),
        "gan": (*_SAMPLE_ANY, "eval.reference_split"),
    },
    "sweep": {
        "diffusion": ("seed", *_SAMPLE_ANY, "sample.eta", "diffusion", *_EVAL_FID, "eval.ddim_steps_sweep"),
        "gan": ("sample.eta", "eval.extractor", "eval.ddim_steps_sweep"),
    },
    "evaluate": {
        "any": (
            "seed",
            "data.hflip",
            *_EVAL_FID,
            "eval.kid_subsets",
            "eval.clean_fid",
            "eval.memorisation_threshold",
        )
    },
    "report": {
        "any": (
            "datasets",
            "models",
            "presets",
            "model.sr",
            "model.mss_levels",
            "model.mixer",
            "eval.ddim_steps_sweep",
        )
    },
}
"""The resolved knobs each stage's outputs depend on beyond its input files, per kind of model (a family
name, `diffusion` = every family but `gan`, `gan`, or `any`). `{dataset}` / `{model}` are the job's
wildcards. The vmunet family's `model` group is narrowed per preset to the keys the preset does not
override (`vmddpm_csm` sets `sr: none`, so a change of `model.sr` leaves it alone). A preset "reads" every
key of its family's group that it does not override.

Snakemake passes exactly these (resolved) to each job as `params` (`stage_params`), so a change reruns
exactly the jobs that read it; dvc.yaml is generated from the same table (`dvc_yaml`), one train stage per
preset, so DVC reruns the same jobs."""


def _kind(stage: str, family: str | None) -> str:
    table = STAGE_PARAMS[stage]
    if family in table:
        return str(family)
    if family is not None:
        group = "gan" if family == "gan" else "diffusion"
        if group in table:
            return group
    if "any" in table:
        return "any"
    raise KeyError(f"stage {stage} has no params for family {family}")


def stage_keys(cfg: Config, stage: str, dataset: str | None = None, model: str | None = None) -> list[str]:
    """The dotted keys of `cfg` that a job of `stage` reads (groups where the whole group is read)."""
    family = cfg.preset(model).family if model is not None else None
    keys: list[str] = []
    for key in STAGE_PARAMS[stage][_kind(stage, family)]:
        if key == "model" and family == "vmunet":
            overridden = set(cfg.preset(str(model)).model or {})
            keys += [f"model.{k}" for k in dataclasses.asdict(cfg.model) if k not in overridden]
            continue
        keys.append(key.format(dataset=dataset, model=model))
    return keys


def _lookup(data: Mapping[str, Any], key: str) -> Any:
    node: Any = data
    for part in key.split("."):
        node = node[part]
    return node


def stage_params(
    cfg: Config, stage: str, dataset: str | None = None, model: str | None = None
) -> dict[str, Any]:
    """The resolved knobs of one job of `stage` (dotted key -> value), as Snakemake's `params:`."""
    data = cfg.to_dict()
    return {key: _lookup(data, key) for key in stage_keys(cfg, stage, dataset, model)}


# ------------------------------------------------------------------------------------ dvc.yaml
DVC_FILE = "dvc.yaml"
SYNC_MARKER = "logs/dvc_commit.done"
"""The output of the Snakemake rule that runs `dvc commit` (Snakemake bookkeeping, not data)."""

_DVC_HEADER = """\
# The same DAG as the Snakemake workflow, for `dvc repro` / `dvc exp run -S key=value`. GENERATED from
# params.yaml and vmddpm/pipeline.py (STAGE_PARAMS): do not edit; regenerate with
#   vmddpm config dvc --write
# after changing `models`, `presets` or the groups of `scales:` (every `vmddpm` command run by DVC, and
# tests/test_config.py, stop when this file is stale). Each stage lists exactly the keys it reads:
# one train stage per preset, because a preset reads only the `model` keys it does not override, so
# `dvc exp run -S model.sr=zigzag` retrains only the presets whose `sr` comes from `model:`; sample and
# sweep split diffusion models from GANs (a GAN reads no `diffusion` or DDIM knob). `scale` and the
# `scales.<name>.<group>` overlays are listed because DVC reads params.yaml unresolved (the overlays of
# the scales that share this DAG: demo and paper; the showcase runs through Snakemake, `make showcase`).
# The last stage, `snakemake-sync`, records what DVC ran in Snakemake's metadata (`snakemake --touch`),
# so `snakemake -n` agrees with `dvc status` after `dvc repro` / `dvc exp run`. dvc.lock is committed:
# see the README.
# `dvc repro` removes a stage's outs before it runs it, so the step checkpoints a rerun resumes from are
# not an out: they live beside each train folder in runs/<dataset>/<model>/checkpoints/ (.dvcignore'd,
# one folder per set of training knobs). Not `persist` either: a rerun with changed knobs must not find
# the old model.pt in place.
"""

_CODE = {
    "download": ["vmddpm/data", "vmddpm/stages/download.py", "vmddpm/config.py"],
    "prepare": ["vmddpm/data", "vmddpm/stages/prepare.py", "vmddpm/config.py"],
    "train": [
        "vmddpm/ops",
        "vmddpm/nn",
        "vmddpm/diffusion.py",
        "vmddpm/trainkit.py",
        "vmddpm/runtime.py",
        "vmddpm/stages/train.py",
        "vmddpm/config.py",
    ],
    "train-gan": [
        "vmddpm/nn",
        "vmddpm/adversarial.py",
        "vmddpm/trainkit.py",
        "vmddpm/runtime.py",
        "vmddpm/stages/gan.py",
        "vmddpm/config.py",
    ],
    "sample": ["vmddpm/stages/sample.py", "vmddpm/generation.py", "vmddpm/diffusion.py"],
    "sample-gan": ["vmddpm/stages/sample.py", "vmddpm/generation.py", "vmddpm/adversarial.py"],
    "sweep": [
        "vmddpm/stages/sweep.py",
        "vmddpm/generation.py",
        "vmddpm/evalkit.py",
        "vmddpm/metrics",
        "vmddpm/diffusion.py",
    ],
    "evaluate": ["vmddpm/stages/evaluate.py", "vmddpm/evalkit.py", "vmddpm/metrics"],
    "report": ["vmddpm/stages/report.py", "vmddpm/report", "vmddpm/plotting.py"],
}

REPORT_TABLES = ("main.md", "main.csv", "main.html", "ablation.md", "ablation.csv", "ablation.html")
REPORT_CLAIMS = "claims.json"
REPORT_SUMMARY = "summary.json"
SYNC_PARAMS_SKIP = ("cpu_memory", "tracking")
"""Top-level keys no stage reads: speed only (`cpu_memory`) or where runs are recorded (`tracking`)."""


def _dvc_keys(
    cfg: Config, doc: Mapping[str, Any], stage: str, item: Mapping[str, str], model: str | None
) -> list[str]:
    """params of one DVC stage: `scale`, the stage's keys (with DVC's `${item...}` templates), and each
    `scales.<name>.<group>` overlay of the groups it reads."""
    keys = stage_keys(cfg, stage, dataset="\0", model=model)
    out = ["scale", *(k.replace("\0", item["dataset"]) for k in keys)]
    groups = dict.fromkeys(k.split(".")[0] for k in keys)
    for name in _same_dag_scales(cfg, doc):
        overlay = doc["scales"][name] or {}
        out += [f"scales.{name}.{g}" for g in groups if g in overlay]
    return list(dict.fromkeys(out))


def _same_dag_scales(cfg: Config, doc: Mapping[str, Any]) -> list[str]:
    """The scales whose resolved matrix and paths are `cfg`'s: those this dvc.yaml can run at. Another
    scale's (the showcase's: one dataset, two models, its own folders) is not listed, so editing its
    overlay reruns no DVC stage; it runs through Snakemake (`make showcase`)."""
    from vmddpm.config import load_config

    out = []
    for name in doc.get("scales") or {}:
        other = load_config(cfg.source, scale=name, document=doc)
        if (other.datasets, other.models, other.paths) == (cfg.datasets, cfg.models, cfg.paths):
            out.append(name)
    return out


def _paths(cfg: Config) -> dict[str, str]:
    return {"data": cfg.paths.data, "runs": cfg.paths.runs, "results": cfg.paths.results}


def dvc_stages(cfg: Config, doc: Mapping[str, Any]) -> dict[str, Any]:
    """The stages of dvc.yaml for `cfg` (the repository's params.yaml, resolved at its own scale) and `doc`
    (the same file unresolved: DVC depends on the raw keys, overlays included)."""
    p = _paths(cfg)
    each = {"dataset": "${item}"}
    pair = {"dataset": "${item.dataset}", "model": "${item.model}"}
    stages: dict[str, Any] = {}

    def raw(ds: str) -> str:
        return f"{p['data']}/raw/{ds}"

    def prepared(ds: str) -> str:
        return f"{p['data']}/prepared/{ds}"

    def run(ds: str, m: str) -> str:
        return f"{p['runs']}/{ds}/{m}"

    stages["download"] = {
        "foreach": "${datasets}",
        "do": {
            "cmd": "vmddpm download --dataset ${item}",
            "deps": _CODE["download"],
            "params": _dvc_keys(cfg, doc, "download", each, None),
            "outs": [raw("${item}")],
        },
    }
    stages["prepare"] = {
        "foreach": "${datasets}",
        "do": {
            "cmd": "vmddpm prepare --dataset ${item}",
            "deps": [raw("${item}"), *_CODE["prepare"]],
            "params": _dvc_keys(cfg, doc, "prepare", each, None),
            "outs": [prepared("${item}")],
        },
    }

    def gan(m: str) -> bool:
        return cfg.preset(m).family == "gan"

    for m in cfg.models:
        stages[f"train-{m}"] = {
            "foreach": "${datasets}",
            "do": {
                "cmd": f"vmddpm train --dataset ${{item}} --model {m}",
                "deps": [prepared("${item}"), *_CODE["train-gan" if gan(m) else "train"]],
                "params": _dvc_keys(cfg, doc, "train", {"dataset": "${item}", "model": m}, m),
                "outs": [f"{run('${item}', m)}/train"],
            },
        }
    kinds = {
        "": [m for m in cfg.models if not gan(m)],
        "-gan": [m for m in cfg.models if gan(m)],
    }
    for suffix, models in kinds.items():
        if not models:
            continue
        r = run("${item.dataset}", "${item.model}")
        stages[f"sample{suffix}"] = {
            "matrix": {"dataset": "${datasets}", "model": models},
            "cmd": "vmddpm sample --dataset ${item.dataset} --model ${item.model}",
            "deps": [f"{r}/train", prepared("${item.dataset}"), *_CODE[f"sample{suffix}"]],
            "params": _dvc_keys(cfg, doc, "sample", pair, models[0]),
            "outs": [f"{r}/samples", f"{r}/samples_grid.png", f"{r}/samples_meta.json"],
        }
    for suffix, models in kinds.items():
        if not models:
            continue
        r = run("${item.dataset}", "${item.model}")
        stages[f"sweep{suffix}"] = {
            "matrix": {"dataset": "${datasets}", "model": models},
            "cmd": "vmddpm sweep --dataset ${item.dataset} --model ${item.model}",
            "deps": [f"{r}/train", prepared("${item.dataset}"), *_CODE["sweep"]],
            "params": _dvc_keys(cfg, doc, "sweep", pair, models[0]),
            "outs": [f"{r}/ddim_sweep", f"{r}/ddim_sweep.json"],
        }
    r = run("${item.dataset}", "${item.model}")
    stages["evaluate"] = {
        "matrix": {"dataset": "${datasets}", "model": list(cfg.models)},
        "cmd": "vmddpm evaluate --dataset ${item.dataset} --model ${item.model}",
        "deps": [f"{r}/samples", prepared("${item.dataset}"), *_CODE["evaluate"]],
        "params": _dvc_keys(cfg, doc, "evaluate", pair, cfg.models[0]),
        "outs": [f"{r}/metrics.json", f"{r}/protocol.json"],
    }
    tables = f"{p['results']}/tables"
    stages["report"] = {
        "cmd": "vmddpm report",
        "deps": [
            p["runs"],
            f"{p['results']}/paper/reference.csv",
            f"{p['results']}/benchmarks/scaling.json",
            *_CODE["report"],
        ],
        "params": _dvc_keys(cfg, doc, "report", {"dataset": ""}, cfg.models[0]),
        # Cached (not committed to git): `dvc push`/`pull` carries them with the runs they summarise. Were
        # they committed, a fresh clone would hold outputs newer than every input and Snakemake (which goes
        # by file times) would regenerate nothing; the committed demo snapshot lives in results/demo/.
        "outs": [f"{tables}/{t}" for t in (*REPORT_TABLES, REPORT_CLAIMS)] + [f"{p['results']}/figures"],
        "metrics": [f"{tables}/{REPORT_SUMMARY}"],
    }
    stages["snakemake-sync"] = {
        "cmd": (
            f"mkdir -p {SYNC_MARKER.rsplit('/', 1)[0]} && touch {SYNC_MARKER} && "
            "snakemake --touch --cores 1 --quiet rules"
        ),
        "deps": [p["runs"], tables, f"{p['results']}/figures"],
        "params": [k for k in doc if k not in SYNC_PARAMS_SKIP],
    }
    return stages


def dvc_yaml(cfg: Config, doc: Mapping[str, Any]) -> str:
    """The text of dvc.yaml (`vmddpm config dvc`)."""
    body = {
        "vars": [DEFAULT_PARAMS],
        "stages": dvc_stages(cfg, doc),
        "plots": [f"{cfg.paths.results}/figures"],
    }
    return _DVC_HEADER + yaml.safe_dump(body, sort_keys=False, width=110)


def dvc_yaml_for(params: str | Path = DEFAULT_PARAMS) -> str:
    """dvc.yaml as generated from the params.yaml at `params` (resolved at its own `scale:`)."""
    from vmddpm.config import load_config, read_yaml

    params = Path(params)
    return dvc_yaml(load_config(params), read_yaml(params))


def dvc_yaml_is_current(params: str | Path = DEFAULT_PARAMS) -> str | None:
    """None when dvc.yaml beside `params` is what `vmddpm config dvc` writes, else a one-line reason."""
    params = Path(params)
    path = params.parent / DVC_FILE
    if not path.is_file():
        return f"{path}: missing; write it with `vmddpm config dvc --write`"
    if path.read_text() != dvc_yaml_for(params):
        return (
            f"{path}: out of date with {params} (models, presets or scales groups changed); "
            "regenerate it with `vmddpm config dvc --write`"
        )
    return None


# ------------------------------------------------------------------------ Snakemake's --config
def _leaves(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, Mapping) and v:
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def set_overrides(base: Config, cfg: Config) -> list[str]:
    """`KEY=VALUE` overrides (`vmddpm --set`, values in JSON, which YAML reads back) that turn the resolved
    `base` into the resolved `cfg` (the same scale): how a Snakemake job gets what `--config` /
    `--configfile` changed. Empty when they agree."""
    import json

    before = _leaves(base.to_dict())
    return [
        f"{key}={json.dumps(value)}"
        for key, value in _leaves(cfg.to_dict()).items()
        if key != "scale" and before.get(key, ...) != value
    ]
