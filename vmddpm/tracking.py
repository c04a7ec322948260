"""MLflow tracking: one run per stage invocation (`train`, `sample`, `evaluate`, ...).

Why a wrapper instead of calling `mlflow` directly:

- the store comes from `tracking.uri` (default `sqlite:///mlflow.db`); a relative sqlite path is made
  absolute against `cfg.root` (the folder of params.yaml), so a stage run from any working directory,
  by Snakemake or DVC, lands in the same store. Artifacts of a local store go to `<root>/mlartifacts`.
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


class Run(NullRun):
    """A live MLflow run; every call goes through the retrying store client."""

    def __init__(self, client: Any, run_id: str, retries: int) -> None:
        self.client = client
        self.run_id = run_id
        self.retries = retries

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


def _artifact_location(cfg: Config, uri: str) -> str | None:
    """A local store's artifacts go to <root>/mlartifacts (not ./mlruns of whatever cwd)."""
    if uri.startswith("sqlite:") or "://" not in uri:
        return (cfg.root / "mlartifacts").resolve().as_uri()
    return None


def git_commit(root: Path) -> str | None:
    """HEAD of the checkout holding the vmddpm code (editable install), else of `root`; None outside git."""
    for folder in (Path(__file__).resolve().parents[1], root):
        commit = _git_head(folder)
        if commit:
            return commit
    return None


def _git_head(root: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def _quiet_mlflow() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    for name in ("mlflow", "alembic", "sqlalchemy", "git"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _experiment_id(client: Any, name: str, artifact_location: str | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)  # a race -> "already exists"


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


@contextlib.contextmanager
def start_run(
    cfg: Config,
    stage: str,
    *,
    dataset: str | None = None,
    model: str | None = None,
    tags: Mapping[str, Any] | None = None,
    output: str | Path | None = None,
) -> Iterator[NullRun]:
    """One MLflow run for one stage invocation; status FINISHED on success, KILLED on SIGINT/SIGTERM,
    FAILED otherwise. `output`: the path the stage writes (its lock held by the caller); stale RUNNING
    runs of it are marked FAILED first."""
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
    with _init_lock(uri):  # the first writer creates the schema; others must not migrate it concurrently
        client = retry(MlflowClient, tracking_uri=uri, retries=retries)
        exp_id = retry(
            _experiment_id, client, cfg.tracking.experiment, _artifact_location(cfg, uri), retries=retries
        )
    all_tags: dict[str, str] = {"stage": stage, "scale": cfg.scale, "vmddpm_version": __version__}
    if dataset:
        all_tags["dataset"] = dataset
    if model:
        all_tags["model"] = model
    commit = git_commit(cfg.root)
    if commit:
        all_tags["git_commit"] = commit
        all_tags["mlflow.source.git.commit"] = commit
    all_tags.update({k: str(v) for k, v in (tags or {}).items()})
    if output is not None:
        output = str(Path(output).resolve())
        all_tags.update(
            {OUTPUT_TAG: output, "vmddpm.pid": str(os.getpid()), "vmddpm.host": socket.gethostname()}
        )
        fail_stale_runs(client, exp_id, output, retries)
    name = "-".join(x for x in (stage, dataset, model) if x)
    info = retry(client.create_run, exp_id, tags=all_tags, run_name=name, retries=retries).info
    run = Run(client, info.run_id, retries)
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
