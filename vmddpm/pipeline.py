"""What the pipeline tools get from the config: the JSON schema of params.yaml and the knobs of each stage.

- `params_schema()` / `schema_yaml()`: the JSON schema (draft 2020-12) Snakemake validates params.yaml
  against at start-up, generated from the typed models of `vmddpm.config` and committed as
  `SCHEMA_FILE` (`vmddpm config schema > workflow/schemas/params.schema.yaml`; a test keeps them equal);
- `STAGE_PARAMS`: the resolved knobs each stage's outputs depend on, the one list behind the `params:`
  of every Snakemake rule (`stage_params()`) and of every `dvc.yaml` stage (`dvc_params()`; a test keeps
  dvc.yaml equal to it).

Torch-free: `workflow/rules/common.smk` imports it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from vmddpm.config import Config, Document, type_adapter

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
            name: {"anyOf": [{"$ref": "#/$defs/PartialDocument"}, {"type": "null"}]}
            for name in ("demo", "paper")
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
STAGE_PARAMS: dict[str, tuple[str, ...]] = {
    "download": ("data.{dataset}", "data.phantoms", "data.max_unpacked_bytes"),
    "prepare": ("seed", "data.image_size", "data.split", "data.{dataset}"),
    "train": ("seed", "data.image_size", "data.hflip", "{family}", "presets.{model}", "diffusion", "train"),
    "sample": ("sample", "diffusion", "eval.reference_split"),
    "sweep": ("seed", "sample", "diffusion", "eval"),
    "evaluate": ("seed", "data.hflip", "eval"),
    "report": ("datasets", "models", "scale"),
}
"""The resolved knobs each stage's outputs depend on. `{dataset}` / `{model}` are the job's wildcards;
`{family}` is the group of the model's family (`model` for vmunet, `baselines.<family>` otherwise).
Snakemake passes exactly these to each job (a change reruns exactly the affected jobs); `dvc.yaml` lists
them per stage (`dvc_params`)."""

FAMILY_GROUP = {
    "vmunet": "model",
    "unet_attn": "baselines.unet_attn",
    "dit": "baselines.dit",
    "gan": "baselines.gan",
}


def stage_params(
    cfg: Config, stage: str, dataset: str | None = None, model: str | None = None
) -> dict[str, Any]:
    """The resolved knobs of one job of `stage` (dotted key -> value), as Snakemake's `params:`."""
    data = cfg.to_dict()
    out: dict[str, Any] = {}
    for key in STAGE_PARAMS[stage]:
        if "{family}" in key:
            key = FAMILY_GROUP[cfg.preset(str(model)).family]
        key = key.format(dataset=dataset, model=model)
        node: Any = data
        for part in key.split("."):
            node = node[part]
        out[key] = node
    return out


def dvc_params(stage: str, overlay: Mapping[str, Any], *, foreach: bool = False) -> list[str]:
    """`params:` of `stage` in dvc.yaml: `scale`, the stage's keys (templated for DVC's `foreach` or
    `matrix`), and `scales.demo.<group>` for each group of them that the demo overlay (`overlay`)
    sets, since DVC reads params.yaml unresolved."""
    item = {"dataset": "${item}"} if foreach else {"dataset": "${item.dataset}", "model": "${item.model}"}
    keys = ["scale"]
    for key in STAGE_PARAMS[stage]:
        if key == "{family}":
            keys += ["model", "baselines"]
        else:
            keys.append(key.format(**item) if "{" in key else key)
    groups = dict.fromkeys(k.split(".")[0] for k in keys[1:])
    keys += [f"scales.demo.{g}" for g in groups if g in (overlay or {})]
    return list(dict.fromkeys(keys))
