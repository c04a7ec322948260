"""params.yaml -> typed Config: overlay, overrides and one-line errors for every kind of bad input."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import yaml

from vmddpm.config import (
    DATASETS,
    Config,
    ConfigError,
    ModelConfig,
    deep_merge,
    load_config,
)
from vmddpm.pipeline import SCHEMA_FILE, STAGE_PARAMS, dvc_yaml_for, schema_yaml, stage_keys, stage_params

from .conftest import ROOT


@pytest.fixture
def params(tmp_path: Path) -> Path:
    p = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", p)
    return p


def _edit(path: Path, edit) -> None:
    doc = yaml.safe_load(path.read_text())
    edit(doc)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def _error(path: Path, **kw) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(path, **kw)
    msg = str(exc.value)
    assert "\n" not in msg, "errors are one line"
    named = [str(path)] + [f"--set {item}" for item in kw.get("overrides", ())]
    assert any(msg.startswith(n + ":") for n in named), "errors name the file, or the --set it came from"
    return msg


def test_repo_params_load_at_both_scales() -> None:
    demo = load_config(ROOT / "params.yaml", scale="demo")
    paper = load_config(ROOT / "params.yaml", scale="paper")
    assert isinstance(demo, Config) and demo.scale == "demo" and paper.scale == "paper"
    # the overlay changes what it names and nothing else
    doc = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert paper.train.steps == doc["train"]["steps"]
    assert demo.train.steps == doc["scales"]["demo"]["train"]["steps"]
    assert demo.data.image_size < paper.data.image_size
    assert demo.diffusion == paper.diffusion  # not in the demo overlay
    assert set(demo.datasets) <= set(DATASETS)
    for name in demo.models:
        demo.preset(name)  # every model of the matrix is a preset


def test_overlay_is_deep_merge_not_replace() -> None:
    merged = deep_merge({"a": {"x": 1, "y": 2}, "b": 3}, {"a": {"y": 5}})
    assert merged == {"a": {"x": 1, "y": 5}, "b": 3}


def test_overrides_apply_after_overlay_and_are_typed(params: Path) -> None:
    cfg = load_config(params, overrides=["train.steps=7", "model.channel_mult=[1, 2, 3]", "train.lr=1e-3"])
    assert cfg.train.steps == 7
    assert cfg.model.channel_mult == [1, 2, 3]
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == pytest.approx(1e-3)


def test_presets_merge_over_model_group(params: Path) -> None:
    cfg = load_config(params)
    assert cfg.model_config("vmddpm_csm").sr == "none"
    assert cfg.model_config("vmddpm").sr == cfg.model.sr
    assert isinstance(cfg.model_config("vmddpm_cnn_only"), ModelConfig)
    with pytest.raises(ConfigError, match="did you mean vmddpm"):
        cfg.preset("vmdpm")


def test_config_is_frozen(params: Path) -> None:
    cfg = load_config(params)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.steps = 3  # type: ignore[misc]


def test_paths_resolve_against_params_folder(params: Path) -> None:
    cfg = load_config(params)
    assert cfg.prepared_dir("acdc") == params.parent / "data" / "prepared" / "acdc"
    assert cfg.metrics_path("acdc", "vmddpm") == params.parent / "runs" / "acdc" / "vmddpm" / "metrics.json"


def test_unknown_key_suggests_nearest(params: Path) -> None:
    _edit(params, lambda d: d["train"].update(lr_rate=0.1))
    assert _error(params).endswith("train.lr_rate is not a known key; did you mean train.lr?")


def test_unknown_key_in_overlay_names_overlay_path(params: Path) -> None:
    _edit(params, lambda d: d["scales"]["demo"]["train"].update(stpes=3))
    assert "scales.demo.train.stpes is not a known key; did you mean scales.demo.train.steps?" in _error(
        params
    )


def test_unknown_key_in_preset(params: Path) -> None:
    _edit(params, lambda d: d["presets"]["vmddpm_csm"]["model"].update(srr="none"))
    assert "presets.vmddpm_csm.model.srr is not a known key; did you mean" in _error(params)


def test_wrong_type(params: Path) -> None:
    _edit(params, lambda d: d["train"].update(batch_size="big"))
    assert "train.batch_size must be int, got 'big'" in _error(params)


def test_bool_is_not_an_int(params: Path) -> None:
    _edit(params, lambda d: d["train"].update(steps=True))
    assert "train.steps must be int" in _error(params)


def test_negative_steps(params: Path) -> None:
    _edit(params, lambda d: d["train"].update(steps=-5))
    assert "train.steps must be >= 1, got -5" in _error(params, scale="paper")


def test_choice_with_suggestion(params: Path) -> None:
    msg = _error(params, overrides=["model.sr=zigzg"])
    assert "model.sr must be one of none | window | zigzag | random" in msg and "zigzag?" in msg


def test_missing_params_file(tmp_path: Path) -> None:
    msg = _error(tmp_path / "nope.yaml")
    assert "no such file" in msg and "--params" in msg


def test_malformed_yaml(params: Path) -> None:
    params.write_text("train:\n  steps: [1, 2\n")
    msg = _error(params)
    assert "malformed YAML at line" in msg


def test_missing_key(params: Path) -> None:
    _edit(params, lambda d: d["train"].pop("lr"))
    assert "train.lr is missing" in _error(params)


def test_unknown_dataset_and_model_in_matrix(params: Path) -> None:
    _edit(params, lambda d: d.update(datasets=["chestxray", "brats"]))
    assert "datasets[1]=brats is not a known dataset; did you mean brats2018?" in _error(params)
    shutil.copy(ROOT / "params.yaml", params)
    _edit(params, lambda d: d.update(models=["vmddpm", "unet_atn"]))
    assert "models[1]=unet_atn is not a known model" in _error(params)


def test_split_must_sum_to_one(params: Path) -> None:
    assert "data.split must sum to 1" in _error(params, overrides=["data.split.test=0.5"])


def test_bad_override_syntax(params: Path) -> None:
    assert "is not KEY=VALUE" in _error(params, overrides=["train.steps"])


def test_flat_params_for_tracking(params: Path) -> None:
    flat = load_config(params).flat()
    assert flat["train.steps"] == "150" or flat["train.steps"].isdigit()
    assert "scales.demo.train.steps" not in flat and "root" not in flat


def test_preset_override_and_overlay_errors_name_their_own_key(params: Path) -> None:
    _edit(params, lambda d: d["presets"]["vmddpm_csm"]["model"].update(sr="zz"))
    assert "presets.vmddpm_csm.model.sr must be one of none | window | zigzag | random" in _error(params)
    shutil.copy(ROOT / "params.yaml", params)
    _edit(params, lambda d: d["scales"]["demo"]["train"].update(lr="fast"))
    assert "scales.demo.train.lr must be float, got 'fast' (str)" in _error(params)
    shutil.copy(ROOT / "params.yaml", params)
    assert "model.dt_rank must be int or one of auto, got 'x'" in _error(
        params, overrides=["model.dt_rank=x"]
    )
    assert "train must be a mapping of keys, got int" in _error(params, overrides=["train=5"])


def test_committed_json_schema_is_generated_from_the_models() -> None:
    """workflow/schemas/params.schema.yaml is `vmddpm config schema`, byte for byte."""
    assert (ROOT / SCHEMA_FILE).read_text() == schema_yaml(), (
        f"regenerate: vmddpm config schema > {SCHEMA_FILE}"
    )


def test_json_schema_accepts_the_repo_params_and_rejects_what_the_models_reject() -> None:
    import jsonschema

    schema = yaml.safe_load((ROOT / SCHEMA_FILE).read_text())
    validator = jsonschema.Draft202012Validator(schema)
    doc = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert not list(validator.iter_errors(doc))
    test_overlay = yaml.safe_load((ROOT / ".test" / "params.yaml").read_text())
    assert not list(validator.iter_errors(deep_merge(doc, test_overlay)))
    for edit in (
        lambda d: d["train"].update(lr_rate=0.1),
        lambda d: d["scales"]["demo"]["train"].update(stpes=3),
        lambda d: d["presets"]["vmddpm_csm"]["model"].update(srr="none"),
        lambda d: d.update(datasets=["chestxray", "mnist"]),
        lambda d: d["sample"].update(device="gpu"),
    ):
        bad = yaml.safe_load((ROOT / "params.yaml").read_text())
        edit(bad)
        assert list(validator.iter_errors(bad)), edit


def test_dvc_yaml_is_generated_from_params_yaml() -> None:
    """dvc.yaml is `vmddpm config dvc`, byte for byte (a stale file would list the wrong params)."""
    assert (ROOT / "dvc.yaml").read_text() == dvc_yaml_for(ROOT / "params.yaml"), (
        "regenerate: vmddpm config dvc --write"
    )


def test_every_dvc_job_lists_exactly_the_keys_its_snakemake_job_reads() -> None:
    """DVC's own view of dvc.yaml (templates resolved): each job's params are `scale`, the keys
    STAGE_PARAMS gives the same Snakemake job, and the `scales.demo` overlay of their groups."""
    from dvc.repo import Repo

    cfg = load_config(ROOT / "params.yaml")
    overlay = yaml.safe_load((ROOT / "params.yaml").read_text())["scales"]["demo"]
    seen = set()
    with Repo(str(ROOT)) as repo:
        for st in repo.index.stages:
            args = st.cmd.split()
            ds = args[args.index("--dataset") + 1] if "--dataset" in args else None
            model = args[args.index("--model") + 1] if "--model" in args else None
            stage = args[1]
            listed = [k for p in st.deps if hasattr(p, "params") and p.params for k in p.params]
            if st.name == "snakemake-sync":
                assert "cpu_memory" not in listed and "tracking" not in listed and "model" in listed
                continue
            keys = stage_keys(cfg, stage, ds, model)
            groups = dict.fromkeys(k.split(".")[0] for k in keys)
            assert listed == ["scale", *keys, *(f"scales.demo.{g}" for g in groups if g in overlay)], st.name
            seen.add((stage, ds, model))
    pairs = {(d, m) for d in cfg.datasets for m in cfg.models}
    for stage in ("train", "sample", "sweep", "evaluate"):
        assert {(d, m) for s, d, m in seen if s == stage} == pairs, stage


def test_a_preset_reads_only_what_it_does_not_override() -> None:
    """So one knob reruns only what it changes: `model.sr` is read by the presets that take it from
    `model:`, never by the SR ablations that set their own, nor by another family."""
    cfg = load_config(ROOT / "params.yaml")
    readers = {m for m in cfg.presets if "model.sr" in stage_keys(cfg, "train", "acdc", m)}
    assert readers == {
        "vmddpm",
        "vmddpm_single_level",
        "vmddpm_cnn_only",
        "vmddpm_ssm_only",
        "vmddpm_attention",
    }
    assert not any(k.startswith("model") for k in stage_keys(cfg, "train", "acdc", "unet_attn"))
    gan = stage_keys(cfg, "train", "acdc", "dcgan")
    assert "diffusion" not in gan and "train.lr" not in gan and "baselines.gan" in gan
    assert "diffusion" not in stage_keys(cfg, "sample", "acdc", "dcgan")
    assert "sample.steps" not in stage_keys(cfg, "sweep", "acdc", "vmddpm")  # the sweep sets its own
    assert "eval.ddim_steps_sweep" not in stage_keys(cfg, "evaluate", "acdc", "vmddpm")


def test_stage_params_resolve_for_every_job() -> None:
    cfg = load_config(ROOT / "params.yaml")
    assert stage_params(cfg, "train", "acdc", "dcgan")["baselines.gan"] == dataclasses.asdict(
        cfg.baselines.gan
    )
    assert stage_params(cfg, "train", "acdc", "vmddpm")["model.sr"] == cfg.model.sr
    assert "model.sr" not in stage_params(cfg, "train", "acdc", "vmddpm_csm")
    assert stage_params(cfg, "train", "acdc", "vmddpm_csm")["presets.vmddpm_csm"]["model"] == {"sr": "none"}
    assert stage_params(cfg, "download", "acdc")["data.acdc"]["source"] == "phantom"
    for stage in STAGE_PARAMS:
        for model in cfg.models:
            assert stage_params(cfg, stage, "chestxray", model)
