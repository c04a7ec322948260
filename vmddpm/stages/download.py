"""`vmddpm download`: fetch (or locate) a dataset's raw archive, verify it, and extract it safely.

Why so careful: the raw archives are large, come over flaky links and from third parties, and every
later stage trusts what lands in `data/raw/<dataset>`. So (`vmddpm.data.download`):

- downloads resume (HTTP Range) after a dropped connection, retry with exponential back-off, and
  land under a `.part` name that is renamed only after the size and sha256 check passed: a bad or
  partial file is never kept under the final name;
- checksums are pinned in `vmddpm/data/sources.py` or, where none is published, recorded in
  `data/raw/CHECKSUMS` on the first verified download and enforced from then on;
- extraction rejects absolute paths, `..`, links that leave the target, special files, and archives
  that would unpack larger than `data.max_unpacked_bytes`; it extracts into a temporary folder of its
  own process that is renamed into place together with a completion marker, so an interrupted extract
  never looks finished and a second `download` is a no-op;
- one process per dataset: the stage holds `data/raw/.<dataset>.lock`; a second `vmddpm download` of
  the same dataset stops at once, naming the first one's pid (two of them once shared a temporary
  folder and installed a partial tree).

The demo scale (`source: phantom`) generates the phantom archive (`vmddpm.data.phantoms`) and then
goes through exactly the same fetch/verify/extract path via a `file://` URL.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from vmddpm.config import Config
from vmddpm.data.download import (
    MARKER,
    checksums_path,
    fetch,
    gated_error,
    install,
    raw_tree,
    read_checksums,
    record_checksum,
    user_path,
)
from vmddpm.data.phantoms import write_phantoms
from vmddpm.data.sources import SOURCES
from vmddpm.errors import UserError
from vmddpm.io import ensure_writable, output_lock, sha256_file

log = logging.getLogger(__name__)


def download_dataset(cfg: Config, dataset: str) -> Path:
    """`vmddpm download --dataset D`: the raw tree of D, verified and extracted (idempotent)."""
    dcfg = cfg.dataset(dataset)
    if dcfg.raw_dir:
        root = raw_tree(cfg, dataset)
        log.info("%s: using the placed raw tree %s", dataset, root)
        return user_path(cfg, dcfg.raw_dir)
    raw = cfg.raw_dir(dataset)
    with output_lock(raw, "download"):  # one process per output: never two extractions racing
        ensure_writable(raw.parent)
        return _download(cfg, dataset, raw)


def _download(cfg: Config, dataset: str, raw: Path) -> Path:
    src = SOURCES[dataset]
    dcfg = cfg.dataset(dataset)
    default_archive = raw.parent / "archives" / dataset / src.archive
    sums_file = checksums_path(cfg)
    sum_key = f"{dataset}/{src.archive}"
    placed: Path | None = None
    url: str | None = None
    size: int | None = None
    if dcfg.archive:
        placed = user_path(cfg, dcfg.archive)
        if not placed.is_file():
            raise UserError(
                f"{placed}: no such archive (data.{dataset}.archive, set in "
                f"{cfg.origin(f'data.{dataset}.archive')}); fix the path or unset it"
            )
        kind, expected, size = "placed", src.sha256 or read_checksums(sums_file).get(sum_key), src.size
    elif dcfg.source == "phantom":
        phantom = write_phantoms(cfg, dataset, cfg.phantom_dir(dataset), archive=True)
        kind, expected, url = "phantom", sha256_file(phantom), phantom.resolve().as_uri()
    elif dcfg.url:
        kind, expected, url, size = (
            "official",
            src.sha256 or read_checksums(sums_file).get(sum_key),
            dcfg.url,
            src.size,
        )
    elif src.gated:
        if not default_archive.is_file():
            raise gated_error(cfg, dataset, src, default_archive)
        placed = default_archive
        kind, expected, size = "placed", src.sha256 or read_checksums(sums_file).get(sum_key), src.size
    else:
        kind, expected, url, size = (
            "official",
            src.sha256 or read_checksums(sums_file).get(sum_key),
            src.urls[0],
            src.size,
        )

    marker = raw / MARKER
    if marker.is_file():
        done = json.loads(marker.read_text())
        same_archive = placed is None or done.get("archive") == str(placed)
        if done.get("kind") == kind and same_archive and (expected is None or done.get("sha256") == expected):
            log.info("%s: already downloaded and extracted in %s (sha256 %s)", dataset, raw, done["sha256"])
            return raw

    if placed is not None:
        archive = placed
        if size is not None and archive.stat().st_size != size:
            raise UserError(
                f"{archive}: {archive.stat().st_size} bytes, expected {size}; get the archive again"
            )
        sha = sha256_file(archive)
        if expected is not None and sha != expected:
            raise UserError(
                f"{archive}: sha256 {sha} does not match the expected {expected} (from sources.py or "
                f"{sums_file}); get the archive again"
            )
    else:
        assert url is not None
        # phantoms are cached apart, so a demo run never leaves a file where the official one goes
        archive = default_archive.parent / "phantom" / src.archive if kind == "phantom" else default_archive
        sha = fetch(
            url,
            archive,
            sha256=expected,
            size=size,
            timeout=cfg.data.download_timeout_s,
            retries=cfg.data.download_retries,
            backoff=cfg.data.download_backoff_s,
        )

    install(
        archive,
        raw,
        src,
        cfg.data.max_unpacked_bytes,
        {"dataset": dataset, "kind": kind, "sha256": sha, "archive": str(archive), "url": url},
        delete_bad=placed is None and expected is None,
    )
    if expected is None and kind != "phantom":
        record_checksum(sums_file, sum_key, sha)
    return raw
