"""Typed, validated view of `params.yaml`: the single source of every knob.

Why one module: the CLI, the Snakefile and `dvc.yaml` must never repeat a default. Every dataclass
below has *no* defaults for knobs: a value exists only because `params.yaml` says so. Loading:

1. read the YAML (clear error on a missing or malformed file),
2. validate the raw document and the `scales.<name>` overlays (unknown keys with a suggestion,
   wrong types, out-of-range values), each error one line naming file and dotted key,
3. deep-merge the overlay of the chosen scale over the top-level groups (the one place it happens),
4. apply `--set key=value` overrides to the resolved document,
5. build frozen dataclasses.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from vmddpm.errors import UserError

DATASETS: tuple[str, ...] = ("chestxray", "brats2018", "acdc")
FAMILIES: tuple[str, ...] = ("vmunet", "unet_attn", "dit", "gan")
DEFAULT_PARAMS = "params.yaml"
DEMO_LABEL = "demo — not comparable to the paper"
"""The label every number, table and figure made at demo scale or with the random extractor carries."""


class ConfigError(UserError):
    """A user error in params.yaml or an override: the message is one line, fit for stderr."""


def _f(*, min: float | None = None, max: float | None = None, nonempty: bool = False) -> Any:
    """A dataclass field with range metadata (no default: the value must come from params.yaml)."""
    return field(metadata={"min": min, "max": max, "nonempty": nonempty})


# --------------------------------------------------------------------------------------------- groups
@dataclass(frozen=True)
class PathsConfig:
    data: str
    runs: str
    results: str


@dataclass(frozen=True)
class SplitConfig:
    train: float = _f(min=0.0, max=1.0)
    val: float = _f(min=0.0, max=1.0)
    test: float = _f(min=0.0, max=1.0)


@dataclass(frozen=True)
class ChestXRayConfig:
    source: Literal["official", "phantom"]
    archive: str | None
    raw_dir: str | None
    url: str | None
    max_subjects: int = _f(min=0)


@dataclass(frozen=True)
class BratsConfig:
    source: Literal["official", "phantom"]
    archive: str | None
    raw_dir: str | None
    url: str | None
    max_subjects: int = _f(min=0)
    modality: Literal["t1", "t1ce", "t2", "flair"] = _f()
    min_brain_fraction: float = _f(min=0.0, max=1.0)
    percentiles: list[float] = _f(nonempty=True)


@dataclass(frozen=True)
class AcdcConfig:
    source: Literal["official", "phantom"]
    archive: str | None
    raw_dir: str | None
    url: str | None
    max_subjects: int = _f(min=0)
    percentiles: list[float] = _f(nonempty=True)


@dataclass(frozen=True)
class PhantomConfig:
    chestxray_subjects: int = _f(min=3)
    brats2018_subjects: int = _f(min=3)
    acdc_subjects: int = _f(min=3)
    size: int = _f(min=16)
    depth: int = _f(min=4)
    acdc_slices: int = _f(min=1)
    acdc_frames: int = _f(min=2)


@dataclass(frozen=True)
class DataConfig:
    image_size: int = _f(min=8)
    split: SplitConfig = _f()
    hflip: bool = _f()
    max_unpacked_bytes: int = _f(min=1)
    download_timeout_s: float = _f(min=0.1)
    download_retries: int = _f(min=0)
    download_backoff_s: float = _f(min=0.0)
    chestxray: ChestXRayConfig = _f()
    brats2018: BratsConfig = _f()
    acdc: AcdcConfig = _f()
    phantoms: PhantomConfig = _f()


@dataclass(frozen=True)
class ModelConfig:
    """VM-DDPM architecture knobs (vmunet family)."""

    base_channels: int = _f(min=1)
    channel_mult: list[int] = _f(nonempty=True)
    blocks_per_stage: int = _f(min=1)
    time_embed_dim: int = _f(min=1)
    d_state: int = _f(min=1)
    ssm_expand: int = _f(min=1)
    d_conv: int = _f(min=1)
    dt_rank: int | Literal["auto"] = _f()
    sr: Literal["none", "window", "zigzag", "random"] = _f()
    sr_window: int = _f(min=1)
    sr_seed: int = _f(min=0)
    mss_levels: int = _f(min=1, max=4)
    cnn_path: bool = _f()
    ssm_path: bool = _f()
    mixer: Literal["csm", "attention"] = _f()
    attn_heads: int = _f(min=1)
    dropout: float = _f(min=0.0, max=1.0)
    scan_backend: Literal["auto", "cuda", "triton", "cpu", "pscan", "ref"] = _f()
    checkpointing: bool = _f()


@dataclass(frozen=True)
class UNetAttnConfig:
    base_channels: int = _f(min=1)
    channel_mult: list[int] = _f(nonempty=True)
    num_res_blocks: int = _f(min=1)
    attn_resolutions: list[int] = _f()
    heads: int = _f(min=1)
    dropout: float = _f(min=0.0, max=1.0)


@dataclass(frozen=True)
class DiTConfig:
    patch_size: int = _f(min=1)
    hidden_size: int = _f(min=1)
    depth: int = _f(min=1)
    heads: int = _f(min=1)
    mlp_ratio: float = _f(min=0.0)


@dataclass(frozen=True)
class GanConfig:
    z_dim: int = _f(min=1)
    g_channels: int = _f(min=1)
    d_channels: int = _f(min=1)
    lr: float = _f(min=0.0)
    betas: list[float] = _f(nonempty=True)
    n_critic: int = _f(min=1)
    gp_weight: float = _f(min=0.0)


@dataclass(frozen=True)
class BaselinesConfig:
    unet_attn: UNetAttnConfig
    dit: DiTConfig
    gan: GanConfig


@dataclass(frozen=True)
class PresetConfig:
    """A named model of the matrix: a family plus overrides of that family's group."""

    family: Literal["vmunet", "unet_attn", "dit", "gan"]
    model: dict[str, Any] | None = None  # partial ModelConfig, validated at load
    gan_loss: Literal["bce", "wgan_gp"] | None = None


@dataclass(frozen=True)
class DiffusionConfig:
    timesteps: int = _f(min=1)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = _f()
    beta_start: float = _f(min=0.0, max=1.0)
    beta_end: float = _f(min=0.0, max=1.0)
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = _f()


@dataclass(frozen=True)
class TrainConfig:
    steps: int = _f(min=1)
    batch_size: int = _f(min=1)
    grad_accum: int = _f(min=1)
    lr: float = _f(min=0.0)
    weight_decay: float = _f(min=0.0)
    warmup_steps: int = _f(min=0)
    grad_clip: float = _f(min=0.0)
    ema_decay: float = _f(min=0.0, max=1.0)
    ema_warmup_steps: int = _f(min=0)
    amp: Literal["none", "bf16", "fp16"] = _f()
    deterministic: bool = _f()
    checkpoint_every: int = _f(min=1)
    sample_every: int = _f(min=0)
    sample_grid: int = _f(min=1)
    log_every: int = _f(min=1)
    num_workers: int = _f(min=0)
    device: Literal["auto", "cpu", "cuda"] = _f()


@dataclass(frozen=True)
class SampleConfig:
    n_images: int = _f(min=0)
    batch_size: int = _f(min=1)
    sampler: Literal["ddpm", "ddim"] = _f()
    steps: int = _f(min=1)
    eta: float = _f(min=0.0, max=1.0)
    use_ema: bool = _f()
    seed: int = _f(min=0)


@dataclass(frozen=True)
class EvalConfig:
    extractor: Literal["inception", "random-inception"]
    inception_weights: str | None
    reference_split: Literal["train", "val", "test"]
    n_fake: int = _f(min=0)
    kid_subset_size: int = _f(min=2)
    kid_subsets: int = _f(min=1)
    clean_fid: bool = _f()
    batch_size: int = _f(min=1)
    memorisation_threshold: float = _f(min=0.0, max=1.0)
    ddim_steps_sweep: list[int] = _f()
    device: Literal["auto", "cpu", "cuda"] = _f()


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool
    uri: str
    experiment: str
    retries: int = _f(min=0)


@dataclass(frozen=True)
class Document:
    """The shape of params.yaml itself (before the overlay is applied)."""

    scale: Literal["demo", "paper"]
    seed: int = _f(min=0)
    cpu_memory: Literal["retain", "release"] = _f()
    datasets: list[str] = _f(nonempty=True)
    models: list[str] = _f(nonempty=True)
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
    scales: dict[str, dict[str, Any]] = _f()


# ------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class Config(Document):
    """The resolved configuration: params.yaml with the chosen scale's overlay and overrides applied.

    `root` is the folder of params.yaml: relative paths in `paths:` are resolved against it so a
    command gives the same result from any working directory.
    """

    root: Path = Path(".")
    source: Path = Path(DEFAULT_PARAMS)

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

    def samples_dir(self, dataset: str, model: str) -> Path:
        return self.run_dir(dataset, model) / "samples"

    def metrics_path(self, dataset: str, model: str) -> Path:
        return self.run_dir(dataset, model) / "metrics.json"

    def results_dir(self, *parts: str) -> Path:
        return self._path(self.paths.results, *parts)

    # -- export ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The resolved document (no `scales`, no root/source): what `config show` prints."""
        out = dataclasses.asdict(self)
        for k in ("scales", "root", "source"):
            out.pop(k)
        return out

    def flat(self) -> dict[str, str]:
        """Dotted-key view for MLflow params (values stringified, lists kept readable)."""
        return flatten(self.to_dict())


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
) -> Config:
    """Load, validate and resolve `path`. Raises ConfigError with a one-line message."""
    path = Path(path)
    doc = read_yaml(path)
    if scale is not None:
        doc["scale"] = scale
    _check(Document, doc, path, prefix="", partial=False)
    for name, overlay in doc["scales"].items():
        if name not in ("demo", "paper"):
            raise ConfigError(_unknown(path, "scale", f"scales.{name}", ("scales.demo", "scales.paper")))
        _check(Document, overlay or {}, path, prefix=f"scales.{name}.", partial=True)
    if doc["scale"] not in doc["scales"]:
        raise ConfigError(f"{path}: scales.{doc['scale']} is missing; add it (it may be empty: {{}})")
    resolved = deep_merge({k: v for k, v in doc.items()}, doc["scales"][doc["scale"]] or {})
    for item in overrides:
        key, value = parse_override(item, path)
        _set_dotted(resolved, key, value, path)
    _check(Document, resolved, path, prefix="", partial=False)
    _check_semantics(resolved, path)
    built = _build(Document, resolved)
    return Config(
        **{f.name: getattr(built, f.name) for f in dataclasses.fields(Document)},
        root=path.resolve().parent,
        source=path,
    )


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
        doc = _yaml(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "malformed YAML"
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}; fix the syntax there") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping of groups at the top level, got {type(doc).__name__}")
    return doc


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


def _unknown(path: Path, what: str, key: str, valid: Iterable[str]) -> str:
    valid = list(valid)
    leaf = key.rsplit(".", 1)
    head = leaf[0] + "." if len(leaf) == 2 else ""
    return f"{path}: {key} is not a known {what}; {_suggest(leaf[-1], valid, head)}"


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + " | ".join(str(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _check(cls: type, data: Any, path: Path, prefix: str, partial: bool) -> None:
    """Validate `data` against dataclass `cls`; `partial` allows missing keys (overlays, presets)."""
    where = prefix.rstrip(".") or "top level"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: {where} must be a mapping of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise ConfigError(_unknown(path, "key", f"{prefix}{key}", fields))
    for name, f in fields.items():
        key = f"{prefix}{name}"
        if name not in data:
            has_default = f.default is not dataclasses.MISSING
            if not partial and not has_default:
                raise ConfigError(f"{path}: {key} is missing; add it (see the project's params.yaml)")
            continue
        _check_value(hints[name], data[name], path, key, partial, f.metadata)


def _check_value(tp: Any, value: Any, path: Path, key: str, partial: bool, meta: Mapping[str, Any]) -> None:
    origin, args = get_origin(tp), get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        errors = []
        for alt in (a for a in args if a is not type(None)):
            try:
                _check_value(alt, value, path, key, partial, meta)
                return
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        names = " or ".join(_type_name(a) for a in args)
        raise ConfigError(f"{path}: {key} must be {names}, got {value!r}")
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            choices = " | ".join(str(a) for a in args)
            raise ConfigError(f"{path}: {key} must be one of {choices}, got {value!r}{hint}")
        return
    if dataclasses.is_dataclass(tp):
        if tp is PresetConfig:
            _check(tp, value, path, key + ".", partial=False)
            if value.get("model") is not None:
                _check(ModelConfig, value["model"], path, key + ".model.", partial=True)
        else:
            _check(tp, value, path, key + ".", partial)
        return
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: {key} must be a mapping, got {value!r}")
        if meta.get("nonempty") and not value:
            raise ConfigError(f"{path}: {key} must not be empty")
        if args and args[1] is not Any and dataclasses.is_dataclass(args[1]):
            for k, v in value.items():
                _check_value(args[1], v, path, f"{key}.{k}", partial, {})
        return
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: {key} must be a list, got {value!r}")
        if meta.get("nonempty") and not value:
            raise ConfigError(f"{path}: {key} must not be empty")
        for i, v in enumerate(value):
            _check_value(args[0], v, path, f"{key}[{i}]", partial, meta)
        return
    if tp is Any:
        return
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(tp)
    if ok is None:
        raise TypeError(f"config.py: unsupported field type {tp!r} at {key}")
    if not ok:
        raise ConfigError(f"{path}: {key} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and tp in (int, float) and value < lo:
        raise ConfigError(f"{path}: {key} must be >= {lo}, got {value!r}")
    if hi is not None and tp in (int, float) and value > hi:
        raise ConfigError(f"{path}: {key} must be <= {hi}, got {value!r}")


def _check_semantics(doc: Mapping[str, Any], path: Path) -> None:
    """Cross-field rules that a per-field type check cannot see."""
    for i, name in enumerate(doc["datasets"]):
        if name not in DATASETS:
            raise ConfigError(
                f"{path}: datasets[{i}]={name} is not a known dataset; " + _suggest(name, DATASETS)
            )
    for i, name in enumerate(doc["models"]):
        if name not in doc["presets"]:
            raise ConfigError(
                f"{path}: models[{i}]={name} is not a known model (a key of presets); "
                + _suggest(name, doc["presets"])
            )
    split = doc["data"]["split"]
    if abs(sum(split.values()) - 1.0) > 1e-6:
        raise ConfigError(f"{path}: data.split must sum to 1, got {sum(split.values()):g}")
    if doc["diffusion"]["beta_start"] >= doc["diffusion"]["beta_end"]:
        raise ConfigError(f"{path}: diffusion.beta_start must be < diffusion.beta_end")
    if doc["sample"]["steps"] > doc["diffusion"]["timesteps"]:
        raise ConfigError(
            f"{path}: sample.steps must be <= diffusion.timesteps ({doc['diffusion']['timesteps']})"
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


def _build(cls: Any, data: Any) -> Any:
    """Turn validated plain data into (nested) frozen dataclasses."""
    if dataclasses.is_dataclass(cls):
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in data:
                kwargs[f.name] = _build(hints[f.name], data[f.name])
        return cls(**kwargs)
    origin, args = get_origin(cls), get_args(cls)
    if origin in (typing.Union, types.UnionType):
        if data is None:
            return None
        for alt in (a for a in args if a is not type(None)):
            if dataclasses.is_dataclass(alt) or get_origin(alt) in (list, dict):
                return _build(alt, data)
        return float(data) if float in args and isinstance(data, int) and int not in args else data
    if origin is dict:
        vt = args[1] if args else Any
        return {k: _build(vt, v) for k, v in data.items()}
    if origin is list:
        return [_build(args[0], v) for v in data]
    if cls is float:
        return float(data)
    return data
