"""`vmddpm`: the one command-line entry point that every Snakemake rule and DVC stage calls.

Rules of this module:
- argparse never holds a default for a knob: flags left out are `None` and the value comes from
  `params.yaml` (through `vmddpm.config`). `--set KEY=VALUE` overrides any resolved knob.
- a user error (`vmddpm.errors.UserError`) prints one line on stderr and exits 2; `--debug` shows
  the traceback. Unbuilt subcommands say so and exit 2.
- stage modules are imported lazily, so `vmddpm --help` and `vmddpm config show` stay fast and do
  not import torch.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vmddpm import __version__
from vmddpm.config import DATASETS, DEFAULT_PARAMS, Config, load_config
from vmddpm.errors import UserError

log = logging.getLogger("vmddpm")


def _common(top: bool) -> argparse.ArgumentParser:
    """The configuration options, accepted before and after the subcommand.

    The top-level parser holds the real defaults; on subcommands every default is SUPPRESS, so
    `vmddpm --scale paper train ...` and `vmddpm train --scale paper ...` mean the same and a
    subcommand never resets what was given before it.
    """

    def d(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("configuration")
    g.add_argument("--params", default=d(DEFAULT_PARAMS), metavar="PATH", help="params.yaml to read")
    g.add_argument("--scale", choices=("demo", "paper"), default=d(None), help="override `scale:`")
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


def _call(target: str, **kwargs: Any) -> Callable[[Config], Any]:
    """Lazily import `module:function` and call it with the config and `kwargs`."""

    def run(cfg: Config) -> Any:
        module, func = target.split(":")
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("vmddpm"):
                raise UserError(f"`{target}` is not built yet in this version of vmddpm") from None
            raise
        return getattr(mod, func)(cfg, **kwargs)

    return run


def build_parser() -> argparse.ArgumentParser:
    common = _common(top=False)
    parser = argparse.ArgumentParser(
        prog="vmddpm",
        description="VM-DDPM reproducibility pipeline: every stage of the Snakemake/DVC workflow. "
        "Every default comes from params.yaml.",
        parents=[_common(top=True)],
    )
    parser.add_argument("--version", action="version", version=f"vmddpm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

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
    p.add_argument(
        "--ddim-sweep",
        action="store_true",
        help="also sample and evaluate each eval.ddim_steps_sweep entry -> runs/<ds>/<model>/ddim_sweep.json",
    )

    add("report", "paper-vs-ours tables and figures from every metrics.json")

    p = add("reader-study", "blinded real/synthetic reader-study kit")
    rs = p.add_subparsers(dest="action", metavar="ACTION", required=True)
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
    cs = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = cs.add_parser("show", help="print the resolved config", parents=[common])
    show.add_argument("--format", choices=("yaml", "json"), default="yaml")
    cs.add_parser("validate", help="exit 0 if params.yaml is valid", parents=[common])
    get = cs.add_parser("get", help="print one resolved value (dotted key)", parents=[common])
    get.add_argument("key")

    p = add("model", "inspect the registry's networks")
    ms = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    summ = ms.add_parser("summary", help="parameters and shapes per stage", parents=[common])
    _model(summ)
    summ.add_argument("--image-size", type=int, help="default: data.image_size")
    return parser


def _config_command(cfg: Config, args: argparse.Namespace) -> int:
    import yaml

    data = cfg.to_dict()
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


def _dispatch(args: argparse.Namespace) -> Callable[[Config], Any]:
    c = args.command
    if c == "download":
        return _call("vmddpm.data.download:download_dataset", dataset=args.dataset)
    if c == "prepare":
        return _call("vmddpm.data.prepare:prepare_dataset", dataset=args.dataset)
    if c == "phantoms":
        return _call(
            "vmddpm.data.phantoms:write_phantoms",
            dataset=args.dataset,
            out=args.out,
            archive=not args.no_archive,
        )
    if c == "train":
        return _call("vmddpm.train:train", dataset=args.dataset, model=args.model)
    if c == "sample":
        return _call("vmddpm.sample:sample", dataset=args.dataset, model=args.model, out=args.out)
    if c == "evaluate":
        return _call(
            "vmddpm.metrics:evaluate",
            dataset=args.dataset,
            model=args.model,
            samples=args.samples,
            out=args.out,
            ddim_sweep=args.ddim_sweep,
        )
    if c == "report":
        return _call("vmddpm.report:report")
    if c == "reader-study" and args.action == "make":
        return _call(
            "vmddpm.readerstudy:make_study",
            dataset=args.dataset,
            model=args.model,
            n_real=args.n_real,
            n_fake=args.n_fake,
            seed=args.seed,
            out=args.out,
            samples=args.samples,
        )
    if c == "reader-study":
        return _call("vmddpm.readerstudy:score_study", study=args.study, answers=args.answers)
    if c == "config":
        return lambda cfg: _config_command(cfg, args)
    if c == "model":
        return _call("vmddpm.nn.registry:print_summary", model=args.model, image_size=args.image_size)
    raise AssertionError(c)


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.overrides = [*args.overrides, *getattr(args, "sub_overrides", [])]
    setup_logging(args.verbose, args.quiet)
    try:
        cfg = load_config(args.params, scale=args.scale, overrides=args.overrides)
        result = _dispatch(args)(cfg)
    except UserError as e:
        if args.debug:
            raise
        print(f"vmddpm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"vmddpm {args.command}: interrupted; finished outputs are kept, rerun to resume", file=sys.stderr
        )
        return 130
    if isinstance(result, int):
        return result
    if isinstance(result, Path):
        log.info("wrote %s", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
