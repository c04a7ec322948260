"""`vmddpm`: the one command-line entry point that every Snakemake rule and DVC stage calls.

Rules of this module:
- argparse never holds a default for a knob: flags left out are `None` and the value comes from
  `params.yaml` (through `vmddpm.config`). `--set KEY=VALUE` overrides any resolved knob.
- each subcommand names the stage function it calls (`vmddpm.stages.<stage>`), imported when the
  subcommand runs: `vmddpm --help` imports neither torch nor pydantic, `vmddpm config show` no torch.
- a user error (`vmddpm.errors.UserError`) or an operating-system error (read-only or full disk, a file
  where a folder should be: `vmddpm.errors.os_error`) prints one line on stderr and exits 2; `--debug`
  shows the traceback.
- SIGINT and SIGTERM stop a command cleanly (`vmddpm.signals`): one line, exit 130 or 143, the MLflow
  run KILLED, a training run's state checkpointed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmddpm import __version__
from vmddpm.contracts import DATASETS, DEFAULT_PARAMS, SCALES
from vmddpm.errors import UserError

if TYPE_CHECKING:
    from vmddpm.config import Config

log = logging.getLogger("vmddpm")


class Parser(argparse.ArgumentParser):
    """argparse with "did you mean" for a mistyped subcommand or choice (`vmddpm trian` -> train)."""

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        choices = action.choices
        if choices is not None and value not in choices:
            import difflib

            names = [str(c) for c in choices]
            close = difflib.get_close_matches(str(value), names, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else f" (choose from {', '.join(names)})"
            raise argparse.ArgumentError(action, f"invalid choice: {value!r}{hint}")
        super()._check_value(action, value)


def _common(top: bool) -> argparse.ArgumentParser:
    """The configuration options, accepted before and after the subcommand.

    The top-level parser holds the real defaults; on subcommands every default is SUPPRESS, so
    `vmddpm --scale paper train ...` and `vmddpm train --scale paper ...` mean the same and a
    subcommand never resets what was given before it.
    """

    def d(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    p = Parser(add_help=False)
    g = p.add_argument_group("configuration")
    g.add_argument("--params", default=d(DEFAULT_PARAMS), metavar="PATH", help="params.yaml to read")
    g.add_argument("--scale", choices=SCALES, default=d(None), help="override `scale:`")
    g.add_argument(
        "--set",
        dest="overrides" if top else "sub_overrides",  # both kept: see main()
        action="append",
        default=d([]),
        metavar="KEY=VALUE",
        help="override a resolved knob, e.g. --set train.steps=20 (repeatable; value parsed as YAML)",
    )
    g.add_argument("--debug", action="store_true", default=d(False), help="show tracebacks")
    g.add_argument("-v", "--verbose", action="count", default=d(0), help="more logging (-vv: debug)")
    g.add_argument("-q", "--quiet", action="store_true", default=d(False), help="warnings and errors only")
    return p


def _dataset(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, choices=DATASETS)


def _model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a key of `presets:` in params.yaml")


def build_parser() -> argparse.ArgumentParser:
    common = _common(top=False)
    parser = Parser(
        prog="vmddpm",
        description="VM-DDPM reproducibility pipeline: every stage of the Snakemake/DVC workflow. "
        "Every default comes from params.yaml.",
        parents=[_common(top=True)],
    )
    parser.add_argument("--version", action="version", version=f"vmddpm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, parents=[common])

    p = add("download", "fetch (or locate) and verify a dataset's raw archive and extract it")
    _dataset(p)

    p = add("prepare", "raw layout -> 2-D grayscale uint8 PNG slices + manifest with subject-level splits")
    _dataset(p)

    p = add("phantoms", "write deterministic synthetic data in a dataset's exact official raw layout")
    _dataset(p)
    p.add_argument("--out", required=True, type=Path, help="folder to write the raw tree (and archive) into")
    p.add_argument("--no-archive", action="store_true", help="write the tree only, not the packed archive")

    p = add("train", "train a model on a prepared dataset (resumes from the latest checkpoint)")
    _dataset(p)
    _model(p)

    p = add("sample", "generate uint8 PNG samples and a grid from a trained model (resumable)")
    _dataset(p)
    _model(p)
    p.add_argument("--out", type=Path, help="output folder (default: runs/<dataset>/<model>/samples)")

    p = add("evaluate", "FID/KID (+ clean-fid, real-vs-real floor, memorisation) -> metrics.json")
    _dataset(p)
    _model(p)
    p.add_argument("--samples", type=Path, help="folder of generated PNGs (default: the sample stage's)")
    p.add_argument("--out", type=Path, help="metrics file (default: runs/<dataset>/<model>/metrics.json)")

    p = add("sweep", "FID against DDIM steps: sample + evaluate each eval.ddim_steps_sweep entry")
    _dataset(p)
    _model(p)

    add("report", "paper-vs-ours tables and figures from every metrics.json")

    p = add("reader-study", "blinded real/synthetic reader-study kit")
    rs = p.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=Parser)
    m = rs.add_parser("make", help="draw, shuffle and seal a study", parents=[common])
    _dataset(m)
    _model(m)
    m.add_argument("--n-real", type=int, required=True)
    m.add_argument("--n-fake", type=int, required=True)
    m.add_argument("--seed", type=int, help="default: `seed:` of params.yaml")
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--samples", type=Path, help="folder of generated PNGs (default: the sample stage's)")
    s = rs.add_parser("score", help="score readers' answer files against the sealed key", parents=[common])
    s.add_argument("--study", type=Path, required=True)
    s.add_argument("--answers", type=Path, nargs="+", required=True)

    p = add("config", "show or validate the resolved configuration")
    cs = p.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=Parser)
    show = cs.add_parser("show", help="print the resolved config", parents=[common])
    show.add_argument("--format", choices=("yaml", "json"), default="yaml")
    cs.add_parser("validate", help="exit 0 if params.yaml is valid", parents=[common])
    get = cs.add_parser("get", help="print one resolved value (dotted key)", parents=[common])
    get.add_argument("key")
    cs.add_parser(
        "schema",
        help="print the JSON schema of params.yaml (workflow/schemas/params.schema.yaml)",
        parents=[common],
    )
    dvc = cs.add_parser(
        "dvc", help="print dvc.yaml as generated from params.yaml (--write it, --check it)", parents=[common]
    )
    mode = dvc.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="write dvc.yaml beside params.yaml")
    mode.add_argument("--check", action="store_true", help="exit 2 when dvc.yaml is not what it generates")

    p = add("model", "inspect the registry's networks")
    ms = p.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=Parser)
    summ = ms.add_parser("summary", help="parameters and shapes per stage", parents=[common])
    _model(summ)
    summ.add_argument("--image-size", type=int, help="default: data.image_size")
    return parser


def _config_command(cfg: Config, args: argparse.Namespace) -> int:
    import yaml

    data = cfg.to_dict()
    if args.action == "dvc":
        return _dvc_command(cfg, args)
    if args.action == "validate":
        log.info("%s is valid (scale=%s)", cfg.source, cfg.scale)
        return 0
    if args.action == "get":
        node: Any = data
        for part in args.key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise UserError(f"{cfg.source}: {args.key} is not a key of the resolved config")
            node = node[part]
        print(json.dumps(node) if isinstance(node, (dict, list)) else node)
        return 0
    if args.format == "json":
        print(json.dumps(data, indent=2))
    else:
        print(f"# resolved from {cfg.source} at scale={cfg.scale}")
        print(yaml.safe_dump(data, sort_keys=False), end="")
    return 0


def _dvc_command(cfg: Config, args: argparse.Namespace) -> int:
    from vmddpm.io import write_text
    from vmddpm.pipeline import DVC_FILE, dvc_yaml_for, dvc_yaml_is_current

    if args.scale or args.overrides:
        raise UserError("dvc.yaml is generated from params.yaml as written: drop --scale and --set")
    if args.check:
        stale = dvc_yaml_is_current(args.params)
        if stale:
            raise UserError(stale)
        log.info("%s is current with %s", Path(args.params).parent / DVC_FILE, args.params)
        return 0
    text = dvc_yaml_for(args.params)
    if args.write:
        path = Path(args.params).parent / DVC_FILE
        write_text(path, text)
        log.info("wrote %s", path)
        return 0
    print(text, end="")
    return 0


# Each subcommand -> the stage function it calls (imported when it runs: see the module docstring).
def _download(cfg: Config, a: argparse.Namespace) -> Any:
    from vmddpm.stages.download import download_dataset

    return download_dataset(cfg, dataset=a.dataset)


def _prepare(cfg: Config, a: argparse.Namespace) -> Any:
    from vmddpm.stages.prepare import prepare_dataset

    return prepare_dataset(cfg, dataset=a.dataset)


def _phantoms(cfg: Config, a: argparse.Namespace) -> Any:
    from vmddpm.stages.phantoms import phantoms

    return phantoms(cfg, dataset=a.dataset, out=a.out, archive=not a.no_archive)


def _train(cfg: Config, a: argparse.Namespace) -> Any:
    """The gan family trains in its own loop (`vmddpm.stages.gan`), every other in `vmddpm.stages.train`."""
    if cfg.preset(a.model).family == "gan":
        from vmddpm.stages.gan import train_gan

        return train_gan(cfg, dataset=a.dataset, model=a.model)
    from vmddpm.stages.train import train

    return train(cfg, dataset=a.dataset, model=a.model)


def _sample(cfg: Config, a: argparse.Namespace) -> Any:
    from vmddpm.stages.sample import sample

    return sample(cfg, dataset=a.dataset, model=a.model, out=a.out)


def _evaluate(cfg: Config, a: argparse.Namespace) -> Any:
    from vmddpm.stages.evaluate import evaluate

    return evaluate(cfg, dataset=a.dataset, model=a.model, samples=a.samples, out=a.out)


def _sweep(cfg: Config, a: argparse.Namespace) -> Any:
    from vmddpm.stages.sweep import sweep

    return sweep(cfg, dataset=a.dataset, model=a.model)


def _report(cfg: Config, a: argparse.Namespace) -> Any:
    from vmddpm.stages.report import report

    return report(cfg)


def _reader_study(cfg: Config, a: argparse.Namespace) -> Any:
    if a.action == "make":
        from vmddpm.stages.readerstudy import make_study

        return make_study(
            cfg,
            dataset=a.dataset,
            model=a.model,
            n_real=a.n_real,
            n_fake=a.n_fake,
            seed=a.seed,
            out=a.out,
            samples=a.samples,
        )
    from vmddpm.stages.readerstudy import score_study

    return score_study(cfg, study=a.study, answers=a.answers)


def _model_command(cfg: Config, a: argparse.Namespace) -> Any:
    from vmddpm.nn.registry import print_summary

    return print_summary(cfg, model=a.model, image_size=a.image_size)


COMMANDS: dict[str, Callable[[Config, argparse.Namespace], Any]] = {
    "download": _download,
    "prepare": _prepare,
    "phantoms": _phantoms,
    "train": _train,
    "sample": _sample,
    "evaluate": _evaluate,
    "sweep": _sweep,
    "report": _report,
    "reader-study": _reader_study,
    "config": _config_command,
    "model": _model_command,
}


def setup_logging(verbose: int = 0, quiet: bool = False) -> None:
    """Configure logging once, for the whole process (stages only ever call getLogger)."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", force=True
    )
    for noisy in ("alembic", "urllib3", "matplotlib", "PIL", "numba", "filelock", "git"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if verbose == 0:
        logging.getLogger("mlflow").setLevel(logging.WARNING)


def _close_progress_bars() -> None:
    """End every open tqdm bar's line, so the error that follows starts a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ()) or ()):
        with contextlib.suppress(Exception):
            bar.close()


def _interrupt(e: BaseException) -> int | None:
    """The exit code of a stop request in `e` or its chain (a KeyboardInterrupt that surfaced inside a C
    extension comes out as a SystemError whose context is the interrupt), else None."""
    from vmddpm.signals import Interrupted

    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, Interrupted):
            return cur.exit_code
        if isinstance(cur, KeyboardInterrupt):
            return 130
        cur = cur.__cause__ or cur.__context__
    return None


_COMMAND = re.compile(r"\bvmddpm (?=(?:" + "|".join(map(re.escape, COMMANDS)) + r")\b)")


def with_flags(message: str, args: argparse.Namespace) -> str:
    """A message whose suggested `vmddpm <command> ...` keeps the configuration flags the user gave
    (`--params`, `--scale`, `--set`), so the suggestion runs against the same configuration."""
    flags = []
    if args.params != DEFAULT_PARAMS:
        flags += ["--params", shlex.quote(str(args.params))]
    if args.scale:
        flags += ["--scale", args.scale]
    for item in args.overrides:
        flags += ["--set", shlex.quote(item)]
    if not flags:
        return message
    return _COMMAND.sub("vmddpm " + " ".join(flags).replace("\\", "\\\\") + " ", message)


def _check_dvc_yaml(args: argparse.Namespace) -> None:
    """Under DVC (which sets DVC_STAGE): stop when dvc.yaml no longer matches params.yaml's matrix."""
    from vmddpm.pipeline import dvc_yaml_is_current

    stale = dvc_yaml_is_current(args.params)
    if stale:
        raise UserError(stale)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.overrides = [*args.overrides, *getattr(args, "sub_overrides", [])]
    setup_logging(args.verbose, args.quiet)
    from vmddpm import signals
    from vmddpm.errors import os_error

    signals.install()
    try:
        if args.command == "config" and args.action == "schema":
            from vmddpm.pipeline import schema_yaml

            print(schema_yaml(), end="")
            return 0
        from vmddpm.config import load_config

        cfg = load_config(args.params, scale=args.scale, overrides=args.overrides)
        if os.environ.get("DVC_STAGE") and args.command != "config":
            _check_dvc_yaml(args)
        result = COMMANDS[args.command](cfg, args)
    except (UserError, OSError) as e:
        if args.debug:
            raise
        msg = e if isinstance(e, UserError) else os_error(e)
        _close_progress_bars()
        print(f"vmddpm {args.command}: error: {with_flags(str(msg), args)}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemError) as e:
        code = _interrupt(e)
        if code is None or args.debug:
            raise
        name = "SIGTERM" if code == 143 else "SIGINT"
        _close_progress_bars()
        print(
            f"vmddpm {args.command}: stopped by {name}; finished outputs are kept, rerun to resume",
            file=sys.stderr,
        )
        return code
    if isinstance(result, int):
        return result
    if isinstance(result, Path):
        log.info("wrote %s", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
