"""`vmddpm prepare`: a dataset's raw tree -> uint8 PNG slices + `manifest.csv` with subject-level splits.

The output folder (`data/prepared/<dataset>/`, manifest columns in `vmddpm.contracts`) is built beside
its final name (in a temporary folder of this process's own) and swapped in with `prepare.json`, the
fingerprint of every input and knob (the raw tree by its files: names and sizes, and for a placed
`raw_dir` also modification times): a second run with the same inputs is a no-op; an interrupted run
leaves the previous output (or nothing) and a rerun completes; a bad input raises a one-line UserError
and leaves finished outputs untouched. One process per output (`.<dataset>.lock` beside it). The pieces
are `vmddpm.data.prepare` and the dataset readers.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np

from vmddpm import io
from vmddpm.config import Config
from vmddpm.contracts import MANIFEST, SPLITS
from vmddpm.data.download import raw_tree
from vmddpm.data.prepare import DONE, fingerprint, reader, split_subjects, write_manifest, write_slices
from vmddpm.errors import UserError

log = logging.getLogger(__name__)


def prepare_dataset(cfg: Config, dataset: str) -> Path:
    """`vmddpm prepare --dataset D`: write `cfg.prepared_dir(D)`; returns it."""
    cfg.dataset(dataset)
    out = cfg.prepared_dir(dataset)
    with io.output_lock(out, "prepare"):  # one process per output
        return _prepare(cfg, dataset, out)


def _prepare(cfg: Config, dataset: str, out: Path) -> Path:
    root = raw_tree(cfg, dataset)
    fp = fingerprint(cfg, dataset, root)
    done = out / DONE
    if done.is_file() and (out / MANIFEST).is_file():
        try:
            same = json.loads(done.read_text()).get("fingerprint") == fp
        except json.JSONDecodeError:
            same = False
        if same:
            log.info("%s: already prepared in %s (same raw data and knobs)", dataset, out)
            return out

    io.ensure_writable(out.parent)  # before reading a single volume
    mod = reader(dataset)
    subjects = mod.subjects(root, cfg)
    limit = cfg.dataset(dataset).max_subjects
    if limit and len(subjects) > limit:
        keep = set(np.random.default_rng([cfg.seed, 1]).permutation(len(subjects))[:limit].tolist())
        subjects = [s for i, s in enumerate(subjects) if i in keep]
    assign = split_subjects([s.id for s in subjects], asdict(cfg.data.split), cfg.seed)

    with io.build_folder(out, tag="partial") as tmp:
        rows = write_slices(mod, subjects, assign, root, cfg, tmp, dataset)
        if not rows:
            raise UserError(
                f"{root}: no slices came out of {len(subjects)} subjects; check the raw data and knobs"
            )
        write_manifest(tmp, rows)
        counts = {s: sum(r["split"] == s for r in rows) for s in SPLITS}
        subj = {s: len({r["subject"] for r in rows if r["split"] == s}) for s in SPLITS}
        io.write_json(
            tmp / DONE, {"fingerprint": fp, "slices": counts, "subjects": subj, "raw_root": str(root)}
        )
    log.info("%s: prepared %s slices (subjects %s) in %s", dataset, counts, subj, out)
    return out
