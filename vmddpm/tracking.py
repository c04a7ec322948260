"""MLflow tracking: one run per stage invocation (`train`, `sample`, `evaluate`, ...).

Why a wrapper instead of calling `mlflow` directly:

- the store comes from `tracking.uri` (default `sqlite:///mlflow.db`); a relative sqlite path is made
  absolute against `cfg.root` (the folder of params.yaml), so a stage run from any working directory,
  by Snakemake or DVC, lands in the same store.
- artifacts of a local store are *relative*: the experiment's location is `mlflow-artifacts:/<name>`,
  which `mlflow ui --backend-store-uri sqlite:///mlflow.db` (run beside the store) serves from its default
  `./mlartifacts`; our own processes write there directly (`local_artifacts`). A moved or cloned
  repository keeps a working store. Other processes read artifacts through `mlflow ui`/`mlflow server`,
  or through `client(cfg)`.
- the experiment opens on its runs in the UI (`mlflow.experimentKind` = custom model development, a
  description); each run has a unique name (`<stage>-<dataset>-<model>-<time>`), the code's commit and
  whether the working tree was dirty, the DVC experiment it belongs to (`dvc_exp`), and sample, sweep
  and evaluate runs are children of the train run whose model they used (`mlflow.parentRunId`, also
  `train_run_id`, which the runs table filters on).
- parallel Snakemake jobs write to one sqlite file: every store call is retried with exponential
  back-off and jitter on "database is locked" and on the races of creating the database or the
  experiment (`tracking.retries` times), so concurrent writers never lose a run.
- `import mlflow` costs seconds: it is imported only when tracking is enabled and a run starts.
- with `tracking.enabled: false` the same code runs against a no-op run object.
- the run's lifecycle: FINISHED on success, KILLED on SIGINT/SIGTERM (`vmddpm.signals` raises them as
  KeyboardInterrupt), FAILED otherwise. A run killed without a chance to say so (kill -9, a lost node)
  stays RUNNING in the store; each run is tagged with the output it writes (`vmddpm.output`) and the
  pid/host writing it, so the next run of that output, which holds the output's lock and so knows the
  old writer is gone, marks such a stale run FAILED (`fail_stale_runs`).

Usage::

    with start_run(cfg, "train", dataset="acdc", model="vmddpm") as run:
        run.log_params(cfg.flat())
        run.log_metrics({"loss": 0.1}, step=10)
        run.log_artifact(grid_png)
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from vmddpm import __version__
from vmddpm.config import Config
from vmddpm.contracts import TRAIN_RUN

log = logging.getLogger(__name__)
T = TypeVar("T")

#: substrings of store errors worth retrying: sqlite locking and creation races between processes
_RETRYABLE = (
    "database is locked",
    "database table is locked",
    "busy",
    "already exists",
    "unique constraint",
    "no such table",
    "disk i/o error",
)
_MAX_PARAMS_PER_BATCH = 100
_MAX_PARAM_LEN = 6000


class NullRun:
    """What `start_run` yields when tracking is disabled: every call is accepted and ignored."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_model(self, net: Any, name: str, registered_name: str, tags: Mapping[str, Any]) -> str | None:
        return None


class Run(NullRun):
    """A live MLflow run; every call goes through the retrying store client."""

    def __init__(
        self, client: Any, run_id: str, retries: int, uri: str = "", experiment_id: str | None = None
    ) -> None:
        self.client = client
        self.run_id = run_id
        self.retries = retries
        self.uri = uri
        self.experiment_id = experiment_id

    def _retry(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return retry(fn, *args, retries=self.retries, **kwargs)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(str(k), str(v)[:_MAX_PARAM_LEN]) for k, v in params.items()]
        for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
            self._retry(self.client.log_batch, self.run_id, params=items[i : i + _MAX_PARAMS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(str(k), float(v), now, int(step or 0)) for k, v in metrics.items()]
        if items:
            self._retry(self.client.log_batch, self.run_id, metrics=items)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._retry(self.client.log_artifact, self.run_id, str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(str(k), str(v)) for k, v in tags.items()]
        if items:
            self._retry(self.client.log_batch, self.run_id, tags=items)

    def log_model(self, net: Any, name: str, registered_name: str, tags: Mapping[str, Any]) -> str | None:
        """Log `net` (a torch module) as this run's MLflow model `name` and register it as a new version of
        `registered_name`; returns the logged model's id. Loading it needs the vmddpm package (its
        classes); its pip requirements are named, not inferred (inference would load it in a subprocess)."""
        import mlflow
        import mlflow.pytorch
        import torch

        mlflow.set_tracking_uri(self.uri)
        mlflow.set_experiment(experiment_id=self.experiment_id)
        info = mlflow.pytorch.log_model(
            net,
            name=name,
            run_id=self.run_id,
            pip_requirements=[f"vmddpm=={__version__}", f"torch=={torch.__version__.split('+')[0]}"],
            serialization_format="pickle",  # `pt2` would trace forward(x, t) with torch.export
            tags={k: str(v) for k, v in tags.items()},
        )
        model_id = info.model_id
        self._retry(_ensure_registered, self.client, registered_name)
        self._retry(
            self.client.create_model_version,
            registered_name,
            f"models:/{model_id}",
            run_id=self.run_id,
            tags={k: str(v) for k, v in tags.items()},
            model_id=model_id,
        )
        return str(model_id)


def _ensure_registered(client: Any, name: str) -> None:
    """Create the registered model `name` unless an earlier run (or a parallel job) did."""
    try:
        client.create_registered_model(name)
    except Exception as e:
        if "already exists" not in str(e).lower():
            raise


def retry(fn: Callable[..., T], *args: Any, retries: int, base_delay: float = 0.1, **kwargs: Any) -> T:
    """Call `fn`, retrying store errors that concurrent writers cause (exponential back-off + jitter)."""
    for attempt in range(retries + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # sqlalchemy / MlflowException wrap the sqlite error text
            text = str(e).lower()
            if attempt == retries or not any(s in text for s in _RETRYABLE):
                raise
            delay = min(base_delay * 2**attempt, 5.0) * (0.5 + random.random())
            log.debug(
                "tracking store busy (%s); retry %d in %.2fs", text.splitlines()[0][:120], attempt + 1, delay
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def resolve_uri(cfg: Config) -> str:
    """`tracking.uri` with a relative sqlite / file path made absolute against the config's root."""
    uri = cfg.tracking.uri
    if uri.startswith("sqlite:///"):
        rest = uri[len("sqlite:///") :]
        if not rest.startswith("/"):  # sqlite:////abs/path keeps its leading slash
            return "sqlite:///" + str((cfg.root / rest).resolve())
        return uri
    if "://" not in uri:  # a bare folder: mlflow's file store
        return str((cfg.root / uri).resolve())
    return uri


EXPERIMENT_KIND = "custom_model_development"
"""`mlflow.experimentKind` of the experiment: MLflow 3's UI opens such an experiment on its runs table
(without it, on the GenAI overview/traces page)."""
ARTIFACTS_DIR = "mlartifacts"
"""Where a local store's artifacts live, beside the store: `mlflow ui`'s default `--artifacts-destination`."""


def _is_local(uri: str) -> bool:
    return uri.startswith("sqlite:") or "://" not in uri


def _artifact_location(cfg: Config, uri: str) -> str | None:
    """A local store's experiment keeps its artifacts at `mlflow-artifacts:/<experiment>`: relative to the
    artifact root `mlflow ui` serves (./mlartifacts beside the store), not an absolute path."""
    if _is_local(uri):
        from urllib.parse import quote

        return f"mlflow-artifacts:/{quote(cfg.tracking.experiment, safe='')}"
    return None


def _local_root(tracking_uri: str) -> Path:
    """The artifact destination of a local store: `mlartifacts/` beside the sqlite file (or file store)."""
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri[len("sqlite:///") :]).parent / ARTIFACTS_DIR
    return Path(tracking_uri).parent / ARTIFACTS_DIR


def local_artifacts() -> None:
    """Let this process read and write `mlflow-artifacts:/...` locations of a local store directly under
    its `mlartifacts/` (what `mlflow ui` does when it proxies them); with an http(s) tracking URI MLflow's
    own proxy client is used, unchanged."""
    from mlflow.store.artifact.artifact_repository_registry import _artifact_repository_registry
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository
    from mlflow.store.artifact.mlflow_artifacts_repo import MlflowArtifactsRepository
    from mlflow.tracking import get_tracking_uri

    def factory(artifact_uri: str, tracking_uri: str | None = None, registry_uri: str | None = None) -> Any:
        uri = tracking_uri or get_tracking_uri()
        if not _is_local(uri):
            return MlflowArtifactsRepository(
                artifact_uri, tracking_uri=tracking_uri, registry_uri=registry_uri
            )
        from urllib.parse import unquote, urlparse

        rel = unquote(urlparse(artifact_uri).path).lstrip("/")
        return LocalArtifactRepository(str(_local_root(uri) / rel))

    _artifact_repository_registry.register("mlflow-artifacts", factory)


def client(cfg: Config) -> Any:
    """An MlflowClient on `cfg`'s store that can also read its relative artifacts (None when disabled)."""
    if not cfg.tracking.enabled:
        return None
    _quiet_mlflow()
    from mlflow.tracking import MlflowClient

    local_artifacts()
    return MlflowClient(tracking_uri=resolve_uri(cfg))


def git_state(root: Path) -> tuple[str | None, bool | None]:
    """(HEAD, dirty) of the checkout holding the vmddpm code, else of `root`: dirty = a tracked file
    differs from HEAD (params.yaml after `dvc exp run -S` counts); (None, None) outside git."""
    for folder in (Path(__file__).resolve().parents[1], root):
        commit = _git(folder, "rev-parse", "HEAD")
        if commit:
            status = _git(folder, "status", "--porcelain", "--untracked-files=no")
            return commit, None if status is None else bool(status)
    return None, None


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def run_name(stage: str, dataset: str | None, model: str | None) -> str:
    """`train-acdc-vmddpm-0612-142233-3f9a`: what ran and when, unique across reruns and experiments."""
    stamp = time.strftime("%m%d-%H%M%S")
    return "-".join(x for x in (stage, dataset, model, stamp, f"{random.getrandbits(16):04x}") if x)


def train_run_id(cfg: Config, dataset: str, model: str) -> str | None:
    """The MLflow run id of the training of `model` on `dataset` (None when untracked or unknown)."""
    import json

    path = cfg.train_dir(dataset, model) / TRAIN_RUN
    try:
        return str(json.loads(path.read_text())["run_id"]) or None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _quiet_mlflow() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    for name in ("mlflow", "alembic", "sqlalchemy", "git"):
        logging.getLogger(name).setLevel(logging.WARNING)


EXPERIMENT_NOTE = (
    "VM-DDPM reproduction (arXiv:2405.05667): one run per stage invocation of the Snakemake/DVC "
    "pipeline. Train runs hold the trained EMA model (registered as vmddpm-<dataset>-<model>); sample, "
    "sweep and evaluate runs are their children (`tags.train_run_id`). Filter e.g. "
    "`tags.stage = 'evaluate' and params.model.sr = 'zigzag'`; demo-scale runs say `tags.scale = 'demo'`."
)


def _experiment_id(client: Any, name: str, artifact_location: str | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.tags.get("mlflow.experimentKind") is None:  # made by an older vmddpm: open on its runs too
            client.set_experiment_tag(exp.experiment_id, "mlflow.experimentKind", EXPERIMENT_KIND)
        return exp.experiment_id
    tags = {"mlflow.experimentKind": EXPERIMENT_KIND, "mlflow.note.content": EXPERIMENT_NOTE}
    # a race with another process -> "already exists", retried (then found above)
    return client.create_experiment(name, artifact_location=artifact_location, tags=tags)


def _init_lock(uri: str) -> contextlib.AbstractContextManager[Any]:
    """An inter-process lock beside a local sqlite store, held while the store is opened.

    MLflow creates and migrates the sqlite schema on first use; two processes doing it at once fail
    ("migration expected to match one row ... in 'alembic_version'"), which retrying cannot repair.
    """
    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    from filelock import FileLock

    db = Path(uri[len("sqlite:///") :])
    db.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(db) + ".lock", timeout=600)


OUTPUT_TAG = "vmddpm.output"


def fail_stale_runs(client: Any, exp_id: str, output: str, retries: int) -> list[str]:
    """Mark FAILED every RUNNING run of `exp_id` tagged with `output`: called by the next run of that
    output while it holds the output's lock, so their writers are gone (kill -9, a lost node)."""
    from mlflow.entities import RunTag

    quoted = output.replace("\\", "\\\\").replace("'", "\\'")
    runs = retry(
        client.search_runs,
        [exp_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`{OUTPUT_TAG}` = '{quoted}'",
        max_results=1000,
        retries=retries,
    )
    stale = [r.info.run_id for r in runs]
    for run_id in stale:
        note = RunTag(
            "vmddpm.stale", f"its process ended without closing it; marked FAILED by pid {os.getpid()}"
        )
        retry(client.log_batch, run_id, tags=[note], retries=retries)
        retry(client.set_terminated, run_id, "FAILED", retries=retries)
        log.warning("MLflow run %s of %s was left RUNNING by a killed process; marked FAILED", run_id, output)
    return stale


def run_tags(
    cfg: Config,
    stage: str,
    *,
    dataset: str | None = None,
    model: str | None = None,
    parent: str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """The tags of every run: what ran (stage, dataset, model, scale), on which code (commit, dirty tree,
    version), in which DVC experiment, and the train run it descends from."""
    out: dict[str, str] = {"stage": stage, "scale": cfg.scale, "vmddpm_version": __version__}
    if dataset:
        out["dataset"] = dataset
    if model:
        out["model"] = model
        out["family"] = cfg.preset(model).family
    commit, dirty = git_state(cfg.root)
    if commit:
        out["git_commit"] = commit
        out["mlflow.source.git.commit"] = commit
    if dirty is not None:
        out["git_dirty"] = str(dirty).lower()
    if os.environ.get("DVC_EXP_NAME"):
        out["dvc_exp"] = os.environ["DVC_EXP_NAME"]
    if os.environ.get("DVC_STAGE"):
        out["dvc_stage"] = os.environ["DVC_STAGE"]
    if parent:
        out["mlflow.parentRunId"] = parent
        out["train_run_id"] = parent
    out.update({k: str(v) for k, v in (tags or {}).items()})
    return out


@contextlib.contextmanager
def start_run(
    cfg: Config,
    stage: str,
    *,
    dataset: str | None = None,
    model: str | None = None,
    tags: Mapping[str, Any] | None = None,
    output: str | Path | None = None,
    parent: str | None = None,
) -> Iterator[NullRun]:
    """One MLflow run for one stage invocation; status FINISHED on success, KILLED on SIGINT/SIGTERM,
    FAILED otherwise. `output`: the path the stage writes (its lock held by the caller); stale RUNNING
    runs of it are marked FAILED first. `parent`: the run id this run is a child of (the train run of
    the model a sample/evaluate run used)."""
    if not cfg.tracking.enabled:
        yield NullRun()
        return
    _quiet_mlflow()
    from mlflow.tracking import MlflowClient

    _quiet_mlflow()  # mlflow configures its own loggers on import

    retries = cfg.tracking.retries
    uri = resolve_uri(cfg)
    if uri.startswith("sqlite:"):  # a second of imports: outside the lock, so parallel jobs do not wait on it
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    if _is_local(uri):
        local_artifacts()
    with _init_lock(uri):  # the first writer creates the schema; others must not migrate it concurrently
        client = retry(MlflowClient, tracking_uri=uri, retries=retries)
        exp_id = retry(
            _experiment_id, client, cfg.tracking.experiment, _artifact_location(cfg, uri), retries=retries
        )
    all_tags = run_tags(cfg, stage, dataset=dataset, model=model, parent=parent, tags=tags)
    if output is not None:
        output = str(Path(output).resolve())
        all_tags.update(
            {OUTPUT_TAG: output, "vmddpm.pid": str(os.getpid()), "vmddpm.host": socket.gethostname()}
        )
        fail_stale_runs(client, exp_id, output, retries)
    name = run_name(stage, dataset, model)
    info = retry(client.create_run, exp_id, tags=all_tags, run_name=name, retries=retries).info
    run = Run(client, info.run_id, retries, uri=uri, experiment_id=exp_id)
    log.info("MLflow run %s (%s) in %s", info.run_id, name, uri)
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        retry(client.set_terminated, info.run_id, status, retries=retries)
