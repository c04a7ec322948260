"""Typed, validated view of `params.yaml`: the single source of every knob, and its one schema.

Why one module: the CLI, the Snakefile and `dvc.yaml` must never repeat a default or a rule. The groups
below are pydantic dataclasses (frozen, `extra="forbid"`, strict types) with *no* defaults for knobs: a
value exists only because `params.yaml` says so. From these models come

- the validation of every load, each error one line naming the file and the dotted key, with the nearest
  valid name ("params.yaml: train.lr_rate is not a known key; did you mean train.lr?");
- through `vmddpm.pipeline`, the JSON schema Snakemake checks at start-up (committed as
  `workflow/schemas/params.schema.yaml`; `vmddpm config schema` prints it) and the params each stage
  reads (`STAGE_PARAMS`, passed by the Snakemake rules and listed in `dvc.yaml`).

Loading:

1. read the YAML (clear error on a missing or malformed file),
2. validate the document, then each `scales.<name>` overlay and each preset's `model:` overrides as
   partial documents (merged over what they override; an error is reported at the overlay's key),
3. deep-merge the overlay of the chosen scale over the top-level groups (the one place it happens),
4. apply `--set key=value` overrides to the resolved document,
5. validate the result (types, ranges, then cross-field rules) into frozen dataclasses.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, TypeAdapter
from pydantic import ValidationError as _ValidationError
from pydantic.dataclasses import dataclass

from vmddpm.contracts import CHECKPOINTS, DATASETS, DEFAULT_PARAMS, DEMO_LABEL, FAMILIES, SCALES
from vmddpm.errors import UserError

__all__ = ["DATASETS", "DEFAULT_PARAMS", "DEMO_LABEL", "FAMILIES", "Config", "ConfigError", "load_config"]


class ConfigError(UserError):
    """A user error in params.yaml or an override: the message is one line, fit for stderr."""


_GROUP = ConfigDict(extra="forbid", allow_inf_nan=False)  # .nan / .inf are never a knob's value


def group(cls: type) -> Any:
    """A params.yaml group: a frozen pydantic dataclass that rejects unknown keys."""
    return dataclass(frozen=True, config=_GROUP)(cls)


def _f(*, min: float | None = None, max: float | None = None, nonempty: bool = False, **extra: Any) -> Any:
    """A knob with a range (no default: the value must come from params.yaml)."""
    return Field(ge=min, le=max, min_length=1 if nonempty else None, json_schema_extra=extra or None)


Int = StrictInt
Float = StrictFloat  # an int is accepted (and stored as float); a bool or a string is not
Bool = StrictBool
Str = StrictStr


# --------------------------------------------------------------------------------------------- groups
@group
class PathsConfig:
    data: Str
    runs: Str
    results: Str


@group
class SplitConfig:
    train: Float = _f(min=0.0, max=1.0)
    val: Float = _f(min=0.0, max=1.0)
    test: Float = _f(min=0.0, max=1.0)


@group
class ChestXRayConfig:
    source: Literal["official", "phantom"]
    archive: Str | None
    raw_dir: Str | None
    url: Str | None
    max_subjects: Int = _f(min=0)


@group
class BratsConfig:
    source: Literal["official", "phantom"]
    archive: Str | None
    raw_dir: Str | None
    url: Str | None
    max_subjects: Int = _f(min=0)
    modality: Literal["t1", "t1ce", "t2", "flair"] = _f()
    min_brain_fraction: Float = _f(min=0.0, max=1.0)
    percentiles: list[Float] = _f(nonempty=True)


@group
class AcdcConfig:
    source: Literal["official", "phantom"]
    archive: Str | None
    raw_dir: Str | None
    url: Str | None
    max_subjects: Int = _f(min=0)
    percentiles: list[Float] = _f(nonempty=True)


@group
class PhantomConfig:
    chestxray_subjects: Int = _f(min=3)
    brats2018_subjects: Int = _f(min=3)
    acdc_subjects: Int = _f(min=3)
    size: Int = _f(min=16)
    depth: Int = _f(min=4)
    acdc_slices: Int = _f(min=1)
    acdc_frames: Int = _f(min=2)


@group
class DataConfig:
    image_size: Int = _f(min=8)
    split: SplitConfig = _f()
    hflip: Bool = _f()
    max_unpacked_bytes: Int = _f(min=1)
    download_timeout_s: Float = _f(min=0.1)
    download_retries: Int = _f(min=0)
    download_backoff_s: Float = _f(min=0.0)
    chestxray: ChestXRayConfig = _f()
    brats2018: BratsConfig = _f()
    acdc: AcdcConfig = _f()
    phantoms: PhantomConfig = _f()


@group
class ModelConfig:
    """VM-DDPM architecture knobs (vmunet family)."""

    base_channels: Int = _f(min=1)
    channel_mult: list[Int] = _f(nonempty=True)
    blocks_per_stage: Int = _f(min=1)
    time_embed_dim: Int = _f(min=1)
    d_state: Int = _f(min=1)
    ssm_expand: Int = _f(min=1)
    d_conv: Int = _f(min=1)
    dt_rank: Int | Literal["auto"] = _f()
    sr: Literal["none", "window", "zigzag", "random"] = _f()
    sr_window: Int = _f(min=1)
    sr_seed: Int = _f(min=0)
    mss_levels: Int = _f(min=1, max=4)
    cnn_path: Bool = _f()
    ssm_path: Bool = _f()
    mixer: Literal["csm", "attention"] = _f()
    attn_heads: Int = _f(min=1)
    dropout: Float = _f(min=0.0, max=1.0)
    scan_backend: Literal["auto", "cuda", "triton", "cpu", "pscan", "ref"] = _f()
    checkpointing: Bool = _f()


@group
class UNetAttnConfig:
    base_channels: Int = _f(min=1)
    channel_mult: list[Int] = _f(nonempty=True)
    num_res_blocks: Int = _f(min=1)
    attn_resolutions: list[Int] = _f()
    heads: Int = _f(min=1)
    dropout: Float = _f(min=0.0, max=1.0)


@group
class DiTConfig:
    patch_size: Int = _f(min=1)
    hidden_size: Int = _f(min=1)
    depth: Int = _f(min=1)
    heads: Int = _f(min=1)
    mlp_ratio: Float = _f(min=0.0)


@group
class GanConfig:
    z_dim: Int = _f(min=1)
    g_channels: Int = _f(min=1)
    d_channels: Int = _f(min=1)
    lr: Float = _f(min=0.0)
    betas: list[Float] = _f(nonempty=True)
    n_critic: Int = _f(min=1)
    gp_weight: Float = _f(min=0.0)


@group
class BaselinesConfig:
    unet_attn: UNetAttnConfig
    dit: DiTConfig
    gan: GanConfig


@group
class PresetConfig:
    """A named model of the matrix: a family plus overrides of that family's group."""

    family: Literal["vmunet", "unet_attn", "dit", "gan"]
    model: dict[str, Any] | None = None  # partial ModelConfig, validated at load
    gan_loss: Literal["bce", "wgan_gp"] | None = None


@group
class DiffusionConfig:
    timesteps: Int = _f(min=1)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = _f()
    beta_start: Float = _f(min=0.0, max=1.0)
    beta_end: Float = _f(min=0.0, max=1.0)
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = _f()


@group
class TrainConfig:
    steps: Int = _f(min=1)
    batch_size: Int = _f(min=1)
    grad_accum: Int = _f(min=1)
    lr: Float = _f(min=0.0)
    weight_decay: Float = _f(min=0.0)
    warmup_steps: Int = _f(min=0)
    grad_clip: Float = _f(min=0.0)
    ema_decay: Float = _f(min=0.0, max=1.0)
    ema_warmup_steps: Int = _f(min=0)
    amp: Literal["none", "bf16", "fp16"] = _f()
    deterministic: Bool = _f()
    checkpoint_every: Int = _f(min=1)
    keep_checkpoints: Int = _f(min=1)
    sample_every: Int = _f(min=0)
    sample_grid: Int = _f(min=1)
    eval_every: Int = _f(min=0)
    eval_images: Int = _f(min=2)
    eval_steps: Int = _f(min=1)
    log_every: Int = _f(min=1)
    num_workers: Int = _f(min=0)
    device: Literal["auto", "cpu", "cuda"] = _f()


@group
class SampleConfig:
    n_images: Int = _f(min=0)
    batch_size: Int = _f(min=1)
    sampler: Literal["ddpm", "ddim"] = _f()
    steps: Int = _f(min=1)
    eta: Float = _f(min=0.0, max=1.0)
    use_ema: Bool = _f()
    seed: Int = _f(min=0)
    device: Literal["auto", "cpu", "cuda"] = _f()


@group
class EvalConfig:
    extractor: Literal["inception", "random-inception"]
    inception_weights: Str | None
    reference_split: Literal["train", "val", "test"]
    n_fake: Int = _f(min=0)
    kid_subset_size: Int = _f(min=2)
    kid_subsets: Int = _f(min=1)
    clean_fid: Bool = _f()
    batch_size: Int = _f(min=1)
    memorisation_threshold: Float = _f(min=0.0, max=1.0)
    ddim_steps_sweep: list[Int] = _f()
    device: Literal["auto", "cpu", "cuda"] = _f()


@group
class TrackingConfig:
    enabled: Bool
    uri: Str
    experiment: Str
    retries: Int = _f(min=0)


@group
class Document:
    """The shape of params.yaml itself (before the overlay is applied)."""

    scale: Literal["demo", "paper", "showcase"]  # = contracts.SCALES
    seed: Int = _f(min=0)
    cpu_memory: Literal["retain", "release"] = _f()
    datasets: list[Str] = _f(nonempty=True, items={"enum": list(DATASETS)}, uniqueItems=True)
    models: list[Str] = _f(nonempty=True, items={"pattern": "^[a-z][a-z0-9_]*$"}, uniqueItems=True)
    paths: PathsConfig = _f()
    data: DataConfig = _f()
    model: ModelConfig = _f()
    baselines: BaselinesConfig = _f()
    presets: dict[str, PresetConfig] = _f(nonempty=True)
    diffusion: DiffusionConfig = _f()
    train: TrainConfig = _f()
    sample: SampleConfig = _f()
    eval: EvalConfig = _f()
    tracking: TrackingConfig = _f()
    scales: dict[str, dict[str, Any] | None] = _f()


# ------------------------------------------------------------------------------------------- config
@group
class Config(Document):
    """The resolved configuration: params.yaml with the chosen scale's overlay and overrides applied.

    `root` is the folder of params.yaml: relative paths in `paths:` are resolved against it so a
    command gives the same result from any working directory.
    """

    root: Path = Path(".")
    source: Path = Path(DEFAULT_PARAMS)
    overrides: tuple[str, ...] = ()  # the `--set KEY=VALUE` items applied, in order

    def origin(self, key: str) -> str:
        """Where the value of dotted `key` came from, for messages: `--set KEY=VALUE` or params.yaml."""
        return _origin(self.source, key, _override_map(self.overrides, self.source))

    # -- the matrix ------------------------------------------------------------------------------
    def preset(self, name: str) -> PresetConfig:
        if name not in self.presets:
            raise ConfigError(_unknown(self.source, "model", name, self.presets))
        return self.presets[name]

    def model_config(self, name: str) -> ModelConfig:
        """The vmunet-family ModelConfig of preset `name` (the `model:` group plus its overrides)."""
        preset = self.preset(name)
        if preset.family != "vmunet":
            raise ConfigError(f"{self.source}: presets.{name} is a {preset.family} model, not vmunet")
        return dataclasses.replace(self.model, **(preset.model or {}))

    def dataset(self, name: str) -> ChestXRayConfig | BratsConfig | AcdcConfig:
        if name not in DATASETS:
            raise ConfigError(_unknown(self.source, "dataset", name, DATASETS))
        return getattr(self.data, name)

    # -- where things live -------------------------------------------------------------------------
    def _path(self, base: str, *parts: str) -> Path:
        return (self.root / base).joinpath(*parts)

    def phantom_dir(self, dataset: str) -> Path:
        return self._path(self.paths.data, "phantoms", dataset)

    def raw_dir(self, dataset: str) -> Path:
        return self._path(self.paths.data, "raw", dataset)

    def prepared_dir(self, dataset: str) -> Path:
        return self._path(self.paths.data, "prepared", dataset)

    def run_dir(self, dataset: str, model: str) -> Path:
        return self._path(self.paths.runs, dataset, model)

    def train_dir(self, dataset: str, model: str) -> Path:
        return self.run_dir(dataset, model) / "train"

    def checkpoints_dir(self, dataset: str, model: str) -> Path:
        """Step checkpoints of every set of training knobs: beside the train folder, never deleted by
        Snakemake or DVC (not a declared output), so a rerun resumes (vmddpm.trainkit)."""
        return self.run_dir(dataset, model) / CHECKPOINTS

    def samples_dir(self, dataset: str, model: str) -> Path:
        return self.run_dir(dataset, model) / "samples"

    def metrics_path(self, dataset: str, model: str) -> Path:
        return self.run_dir(dataset, model) / "metrics.json"

    def protocol_path(self, dataset: str, model: str) -> Path:
        return self.run_dir(dataset, model) / "protocol.json"

    def sweep_path(self, dataset: str, model: str) -> Path:
        return self.run_dir(dataset, model) / "ddim_sweep.json"

    def sweep_dir(self, dataset: str, model: str) -> Path:
        return self.run_dir(dataset, model) / "ddim_sweep"

    def results_dir(self, *parts: str) -> Path:
        return self._path(self.paths.results, *parts)

    # -- export ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The resolved document (no `scales`, no root/source): what `config show` prints."""
        out = dataclasses.asdict(self)
        for k in ("scales", "root", "source", "overrides"):
            out.pop(k)
        return out

    def flat(self) -> dict[str, str]:
        """Dotted-key view for MLflow params (values stringified, lists kept readable)."""
        return flatten(self.to_dict())

    def with_sample(self, **changes: Any) -> Config:
        """A copy whose `sample:` group has `changes` applied (validated like any knob)."""
        try:
            sample = dataclasses.replace(self.sample, **changes)
        except _ValidationError as e:
            raise ConfigError(_message(e, SampleConfig, self.source, "sample.")) from None
        return dataclasses.replace(self, sample=sample)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)
    return out


# ------------------------------------------------------------------------------------------ loading
def load_config(
    path: str | Path = DEFAULT_PARAMS,
    *,
    scale: str | None = None,
    overrides: Iterable[str] = (),
    document: Mapping[str, Any] | None = None,
) -> Config:
    """Load, validate and resolve `path`. Raises ConfigError with a one-line message; an error in a value
    that came from `--set` names that override instead of the file.

    `document`: the content to use instead of reading `path` (which still names it in errors and roots
    relative paths), e.g. Snakemake's `config`: params.yaml merged with `--configfile` / `--config`.
    """
    path = Path(path)
    overrides = tuple(overrides)
    doc = read_yaml(path) if document is None else copy.deepcopy(dict(document))
    if scale is not None:
        doc["scale"] = scale
    _validate(Document, doc, path)
    for name, overlay in doc["scales"].items():
        if name not in SCALES:
            raise ConfigError(_unknown(path, "scale", f"scales.{name}", [f"scales.{s}" for s in SCALES]))
        _validate_partial(Document, doc, overlay or {}, path, f"scales.{name}.")
    if doc["scale"] not in doc["scales"]:
        raise ConfigError(f"{path}: scales.{doc['scale']} is missing; add it (it may be empty: {{}})")
    resolved = deep_merge(doc, doc["scales"][doc["scale"]] or {})
    origins = _override_map(overrides, path)
    for item in overrides:
        key, value = parse_override(item, path)
        _set_dotted(resolved, key, value, Path(origins[key]))
    built = _validate(Document, resolved, path, origins=origins)
    _check_semantics(resolved, path, origins)
    return Config(
        **{f.name: getattr(built, f.name) for f in dataclasses.fields(Document)},
        root=path.resolve().parent,
        source=path,
        overrides=overrides,
    )


def _override_map(overrides: Iterable[str], path: Path) -> dict[str, str]:
    """dotted key -> '--set KEY=VALUE' of each override (the last one wins, as it does for the value)."""
    out: dict[str, str] = {}
    for item in overrides:
        key, _ = parse_override(item, path)
        out[key] = f"--set {item}"
    return out


def _origin(path: Path, key: str, origins: Mapping[str, str] | None) -> str:
    """The override that set `key` (or a group above it, or a key below it), else the params file."""
    for k, label in (origins or {}).items():
        if key == k or key.startswith(k + ".") or k.startswith(key + "."):
            return label
    return str(path)


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-4` as a float (YAML 1.1 wants `1.0e-4`; YAML 1.2 and users don't)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)"
        r"|\.[0-9_]+(?:[eE][-+][0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(
            f"{path}: no such file; run from the repository root or pass --params PATH to a params.yaml"
        )
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not a text file (byte 0x{e.object[e.start]:02x} at offset {e.start} is not UTF-8); "
            "pass --params PATH to a params.yaml"
        ) from None
    except OSError as e:
        raise ConfigError(
            f"{path}: cannot be read ({e.strerror}); check the file and its permissions"
        ) from None
    try:
        _check_duplicates(yaml.compose(text, Loader=_Loader), path)
        doc = _yaml(text)
    except yaml.reader.ReaderError as e:
        raise ConfigError(
            f"{path}: not a text YAML file (character #x{_code(e.character):04x} at offset {e.position} "
            "is not allowed); pass --params PATH to a params.yaml"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "malformed YAML"
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}; fix the syntax there") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping of groups at the top level, got {type(doc).__name__}")
    return doc


def _code(ch: Any) -> int:
    return ord(ch) if isinstance(ch, str) and len(ch) == 1 else int(ch) if isinstance(ch, int) else 0


def _check_duplicates(node: Any, path: Path, prefix: str = "") -> None:
    """A key given twice in one mapping is an error (YAML loaders silently keep the last one)."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            line = key_node.start_mark.line + 1
            if key is not None and key in seen:
                raise ConfigError(
                    f"{path}: {prefix}{key} is given twice (lines {seen[key]} and {line}); keep one"
                )
            if key is not None:
                seen[key] = line
            _check_duplicates(value_node, path, f"{prefix}{key}." if key is not None else prefix)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicates(item, path, f"{prefix.rstrip('.')}[{i}].")


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(item: str, path: Path) -> tuple[str, Any]:
    """`train.steps=20` -> ("train.steps", 20); the value is parsed as YAML (like `dvc exp run -S`)."""
    if "=" not in item:
        raise ConfigError(f"{path}: override {item!r} is not KEY=VALUE; write e.g. --set train.steps=20")
    key, raw = item.split("=", 1)
    try:
        value = _yaml(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _set_dotted(doc: dict[str, Any], key: str, value: Any, path: Path) -> None:
    parts = key.split(".")
    node: Any = doc
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part) if isinstance(node, dict) else None
        if not isinstance(nxt, dict):
            if nxt is None and isinstance(node, dict):
                nxt = node[part] = {}
            else:
                raise ConfigError(f"{path}: {'.'.join(parts[: i + 1])} is not a group; cannot set {key}")
        node = nxt
    node[parts[-1]] = value


# ------------------------------------------------------------------------------------- validation
_ADAPTERS: dict[type, TypeAdapter[Any]] = {}


def type_adapter(cls: type) -> TypeAdapter[Any]:
    if cls not in _ADAPTERS:
        _ADAPTERS[cls] = TypeAdapter(cls)
    return _ADAPTERS[cls]


def _validate(
    cls: type, data: Any, path: Path, prefix: str = "", origins: Mapping[str, str] | None = None
) -> Any:
    """`data` as an instance of `cls`; the first problem as a one-line ConfigError (naming the
    `--set` override it came from, when `origins` holds one for its key)."""
    try:
        built = type_adapter(cls).validate_python(data)
    except _ValidationError as e:
        raise ConfigError(_message(e, cls, path, prefix, origins)) from None
    if cls is Document:
        for name, preset in data["presets"].items():
            if isinstance(preset.get("model"), Mapping):
                model = dataclasses.asdict(built.model)
                _validate_partial(
                    ModelConfig, model, preset["model"], path, f"{prefix}presets.{name}.model.", origins
                )
    return built


def _validate_partial(
    cls: type,
    base: Mapping[str, Any],
    over: Any,
    path: Path,
    prefix: str,
    origins: Mapping[str, str] | None = None,
) -> None:
    """Validate `over`, a partial `cls` (an overlay): merged over the valid `base` it overrides, so only
    its own keys can be wrong, and every error is reported at `prefix` + the key."""
    if not isinstance(over, Mapping):
        where = prefix.rstrip(".")
        raise ConfigError(f"{path}: {where} must be a mapping of keys, got {type(over).__name__}")
    _validate(cls, deep_merge(base, over), path, prefix, origins)


def _message(
    e: _ValidationError, cls: type, path: Path, prefix: str, origins: Mapping[str, str] | None = None
) -> str:
    """The first error of `e` in the project's one-line style (unknown keys first)."""
    errors = e.errors()
    errors.sort(key=lambda err: err["type"] not in ("unexpected_keyword_argument", "extra_forbidden"))
    err = errors[0]
    parts, tp, is_union = _walk(cls, err["loc"])
    key = prefix + _dotted(parts)
    path = Path(_origin(path, key, origins))
    value = err.get("input")
    kind = err["type"]
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        return _unknown(path, "key", key, _field_names(_type_at(cls, parts[:-1])))
    if is_union:  # every member failed: name them all
        same = [x for x in errors if _walk(cls, x["loc"])[0] == parts]
        if len(same) > 1:
            names = " or ".join(_type_name(a) for a in get_args(_strip_optional(tp)))
            return f"{path}: {key} must be {names}, got {value!r}"
    if kind == "missing":
        return f"{path}: {key} is missing; add it (see the project's params.yaml)"
    if kind == "literal_error":
        choices = [str(a) for a in get_args(_literal_of(tp))]
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        return f"{path}: {key} must be one of {' | '.join(choices)}, got {value!r}{hint}"
    if kind in ("int_type", "float_type", "bool_type", "string_type"):
        name = {"int_type": "int", "float_type": "float", "bool_type": "bool", "string_type": "str"}[kind]
        return f"{path}: {key} must be {name}, got {value!r} ({type(value).__name__})"
    if kind == "finite_number":
        return f"{path}: {key} must be a finite number, got {value!r}"
    if kind == "greater_than_equal":
        return f"{path}: {key} must be >= {err['ctx']['ge']}, got {value!r}"
    if kind == "less_than_equal":
        return f"{path}: {key} must be <= {err['ctx']['le']}, got {value!r}"
    if kind == "too_short":
        return f"{path}: {key} must not be empty"
    if kind == "list_type":
        return f"{path}: {key} must be a list, got {value!r}"
    if kind == "dict_type":
        return f"{path}: {key} must be a mapping, got {value!r}"
    if kind in ("dataclass_type", "dataclass_exact_type", "model_type"):
        where = key or "top level"
        return f"{path}: {where} must be a mapping of keys, got {type(value).__name__}"
    return f"{path}: {key or 'top level'}: {err['msg']}"


def _strip_optional(tp: Any) -> Any:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
        return typing.Union[tuple(args)]  # noqa: UP007 (a runtime Union of the remaining members)
    return tp


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (typing.Union, types.UnionType)


def _literal_of(tp: Any) -> Any:
    tp = _strip_optional(tp)
    if _is_union(tp):
        return next(a for a in get_args(tp) if get_origin(a) is Literal)
    return tp


def _unwrap(tp: Any) -> Any:
    """Annotated[int, Strict()] -> int (pydantic's Strict* aliases)."""
    while get_origin(tp) is typing.Annotated:
        tp = get_args(tp)[0]
    return tp


def _walk(cls: type, loc: tuple[Any, ...]) -> tuple[list[Any], Any, bool]:
    """The field path of a pydantic error location (union member tags dropped), the type there, and
    whether that type is a union of several kinds."""
    parts: list[Any] = []
    tp: Any = cls
    items = list(loc)
    while items:
        item = items.pop(0)
        base = _unwrap(_strip_optional(tp))
        if _is_union(base):  # a union member tag ('int', "literal['auto']"): the field is the union
            return parts, tp, True
        if dataclasses.is_dataclass(base):
            hints = typing.get_type_hints(base, include_extras=True)
            parts.append(item)
            tp = hints.get(item, Any)
        elif get_origin(base) is dict:
            parts.append(item)
            tp = get_args(base)[1] if get_args(base) else Any
        elif get_origin(base) is list:
            parts.append(item)
            tp = get_args(base)[0]
        else:
            parts.append(item)
            tp = Any
    return parts, tp, _is_union(_unwrap(_strip_optional(tp)))


def _type_at(cls: type, parts: list[Any]) -> Any:
    return _unwrap(_strip_optional(_walk(cls, tuple(parts))[1]))


def _field_names(tp: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(tp)] if dataclasses.is_dataclass(tp) else []


def _dotted(parts: list[Any]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _unknown(path: Path, what: str, key: str, valid: Iterable[str]) -> str:
    valid = list(valid)
    leaf = key.rsplit(".", 1)
    head = leaf[0] + "." if len(leaf) == 2 else ""
    return f"{path}: {key} is not a known {what}; {_suggest(leaf[-1], valid, head)}"


def _type_name(tp: Any) -> str:
    tp = _unwrap(tp)
    if get_origin(tp) is Literal:
        return "one of " + " | ".join(str(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _check_semantics(doc: Mapping[str, Any], path: Path, origins: Mapping[str, str] | None = None) -> None:
    """Cross-field rules that a per-field type check cannot see."""

    def at(*keys: str) -> str:  # the override that set one of `keys`, else the file
        for key in keys:
            label = _origin(path, key, origins)
            if label != str(path):
                return label
        return str(path)

    for i, name in enumerate(doc["datasets"]):
        if name not in DATASETS:
            raise ConfigError(
                f"{at('datasets')}: datasets[{i}]={name} is not a known dataset; " + _suggest(name, DATASETS)
            )
    for i, name in enumerate(doc["models"]):
        if name not in doc["presets"]:
            raise ConfigError(
                f"{at('models')}: models[{i}]={name} is not a known model (a key of presets); "
                + _suggest(name, doc["presets"])
            )
    split = doc["data"]["split"]
    if abs(sum(split.values()) - 1.0) > 1e-6:
        raise ConfigError(f"{at('data.split')}: data.split must sum to 1, got {sum(split.values()):g}")
    for ds in ("brats2018", "acdc"):
        pct = doc["data"][ds]["percentiles"]
        key = f"data.{ds}.percentiles"
        if len(pct) != 2 or not 0 <= pct[0] < pct[1] <= 100:
            raise ConfigError(f"{at(key)}: {key} must be [low, high] with 0 <= low < high <= 100, got {pct}")
    if doc["diffusion"]["beta_start"] >= doc["diffusion"]["beta_end"]:
        raise ConfigError(
            f"{at('diffusion.beta_start', 'diffusion.beta_end')}: diffusion.beta_start must be < "
            "diffusion.beta_end"
        )
    if doc["train"]["eval_steps"] > doc["diffusion"]["timesteps"]:
        raise ConfigError(
            f"{at('train.eval_steps', 'diffusion.timesteps')}: train.eval_steps must be <= "
            f"diffusion.timesteps ({doc['diffusion']['timesteps']})"
        )
    if doc["sample"]["steps"] > doc["diffusion"]["timesteps"]:
        raise ConfigError(
            f"{at('sample.steps', 'diffusion.timesteps')}: sample.steps must be <= diffusion.timesteps "
            f"({doc['diffusion']['timesteps']})"
        )


def _suggest(name: str, valid: Iterable[str], head: str = "") -> str:
    """'did you mean X?' with the closest valid name (a shared prefix counts, as in lr_rate -> lr)."""
    valid = list(valid)
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    if not close:
        stem = name.split("_")[0]
        close = sorted(
            (v for v in valid if v == stem or name.startswith(v + "_")),
            key=len,
            reverse=True,
        )
    return f"did you mean {head}{close[0]}?" if close else f"valid: {', '.join(sorted(valid))}"
