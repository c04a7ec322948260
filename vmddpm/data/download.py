"""Fetch (or locate) a dataset's raw archive, verify it, and extract it safely: the pieces of the download
stage (`vmddpm.stages.download`).

Why so careful: the raw archives are large, come over flaky links and from third parties, and every
later stage trusts what lands in `data/raw/<dataset>`. So:

- downloads resume (HTTP Range) after a dropped connection, retry with exponential back-off, and
  land under a `.part` name that is renamed only after the size and sha256 check passed: a bad or
  partial file is never kept under the final name;
- checksums are pinned in `sources.py` or, where none is published, recorded in `data/raw/CHECKSUMS`
  on the first verified download and enforced from then on;
- extraction rejects absolute paths, `..`, links that leave the target, special files, and archives
  that would unpack larger than `data.max_unpacked_bytes`; it extracts into a temporary folder that
  is renamed into place together with a completion marker, so an interrupted extract never looks
  finished and a second `download` is a no-op.

The demo scale (`source: phantom`) generates the phantom archive (`vmddpm.data.phantoms`) and then
goes through exactly the same fetch/verify/extract path via a `file://` URL.
"""

from __future__ import annotations

import http.client
import logging
import os
import stat
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any

from tqdm import tqdm

from vmddpm import io
from vmddpm.config import Config
from vmddpm.data.sources import SOURCES, Source
from vmddpm.errors import UserError
from vmddpm.io import sha256_file

log = logging.getLogger(__name__)

MARKER = ".vmddpm-download.json"
CHUNK = 1 << 20


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# ---------------------------------------------------------------------------------------- checksums
def checksums_path(cfg: Config) -> Path:
    return cfg.raw_dir("x").parent / "CHECKSUMS"


def read_checksums(path: Path) -> dict[str, str]:
    """`sha256  dataset/archive` lines (the sha256sum format) -> {name: sha256}."""
    out: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and not line.startswith("#"):
                out[parts[1]] = parts[0]
    return out


def record_checksum(path: Path, name: str, sha: str) -> None:
    sums = read_checksums(path)
    sums[name] = sha
    text = "# sha256 of the first verified download of each archive; enforced on every later one\n"
    text += "".join(f"{v}  {k}\n" for k, v in sorted(sums.items()))
    io.write_text(path, text)
    log.info("recorded sha256 %s of %s in %s", sha, name, path)


# ---------------------------------------------------------------------------------------- fetching
class _Incomplete(Exception):
    """The server closed the connection before the whole body arrived (resumable)."""


def fetch(
    url: str,
    dest: Path,
    *,
    sha256: str | None,
    size: int | None,
    timeout: float,
    retries: int,
    backoff: float,
) -> str:
    """Download `url` to `dest` (resuming a previous `.part`), verify, rename; returns the sha256.

    A size or checksum mismatch deletes the partial file and raises a UserError: nothing bad is ever
    left under `dest`.
    """
    dest = Path(dest)
    if dest.is_file() and sha256 is not None:  # without a checksum an old file cannot be trusted
        have = sha256_file(dest)
        if have == sha256:
            log.info("%s already downloaded", dest)
            return have
        # keep it until a verified replacement is renamed over it
        log.warning("%s: sha256 %s differs from the expected %s; downloading again", dest, have, sha256)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    attempt = 0
    while True:
        try:
            _fetch_once(url, part, timeout)
            break
        except urllib.error.HTTPError as e:
            if e.code < 500 and e.code not in (408, 429):
                raise UserError(
                    f"{url}: HTTP {e.code} {e.reason}; check the address in vmddpm/data/sources.py "
                    "or place the archive yourself and set data.<dataset>.archive"
                ) from None
            err: BaseException = e
        except (_Incomplete, urllib.error.URLError, http.client.HTTPException, OSError) as e:
            err = e
        attempt += 1
        if attempt > retries:
            raise UserError(
                f"{url}: download failed after {retries} retries ({_one_line(err)}); check the network and "
                f"rerun `vmddpm download` (it resumes from {part})"
            ) from None
        delay = backoff * 2 ** (attempt - 1)
        log.warning("%s: %s; retry %d/%d in %.2fs", url, _one_line(err), attempt, retries, delay)
        time.sleep(delay)
    got_size = part.stat().st_size
    if size is not None and got_size != size:
        part.unlink()
        raise UserError(
            f"{dest}: downloaded {got_size} bytes, expected {size}; the bad file was deleted, "
            "rerun `vmddpm download`"
        )
    have = sha256_file(part)
    if sha256 is not None and have != sha256:
        part.unlink()
        raise UserError(
            f"{dest}: sha256 {have} does not match the expected {sha256}; the bad file was deleted, "
            f"rerun `vmddpm download` (or fix the pinned checksum if {url} changed on purpose)"
        )
    os.replace(part, dest)
    return have


def _fetch_once(url: str, part: Path, timeout: float) -> None:
    """One attempt: append to `part` from where it stops (Range), or start over if not supported."""
    offset = part.stat().st_size if part.is_file() else 0
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        src = Path(urllib.request.url2pathname(parsed.path))
        total = src.stat().st_size
        if offset > total:
            offset = 0
        with open(src, "rb") as fin, open(part, "ab" if offset else "wb") as fout:
            fin.seek(offset)
            _copy(fin, fout, offset, total, src.name)
        return
    headers = {"User-Agent": "vmddpm", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # range beyond the end: the .part is complete (or bad: the
            return  # size/sha256 check after this will tell)
        raise
    with resp:
        if offset and resp.status == 206:
            mode = "ab"
            crange = resp.headers.get("Content-Range", "")
            total = int(crange.rsplit("/", 1)[1]) if "/" in crange and not crange.endswith("*") else None
        else:
            mode, offset = "wb", 0
            length = resp.headers.get("Content-Length")
            total = int(length) if length is not None else None
        with open(part, mode) as fout:
            _copy(resp, fout, offset, total, Path(parsed.path).name or parsed.netloc)


def _copy(fin: Any, fout: Any, offset: int, total: int | None, label: str) -> None:
    done = offset
    with tqdm(total=total, initial=offset, unit="B", unit_scale=True, desc=label, leave=False) as bar:
        while True:
            try:
                block = fin.read(CHUNK)
            except http.client.IncompleteRead as e:
                fout.write(e.partial)
                raise _Incomplete(f"connection dropped after {done + len(e.partial)} bytes") from None
            if not block:
                break
            fout.write(block)
            done += len(block)
            bar.update(len(block))
        fout.flush()
        os.fsync(fout.fileno())
    if total is not None and done < total:
        raise _Incomplete(f"connection dropped after {done} of {total} bytes")


# -------------------------------------------------------------------------------------- extraction
def _check_name(archive: Path, name: str) -> PurePosixPath:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or (p.parts and p.parts[0].endswith(":")) or ".." in p.parts:
        raise UserError(
            f"{archive}: entry {name!r} would be written outside the target folder; refusing to extract "
            "this archive (it is corrupt or malicious), get it again from the official source"
        )
    return p


def _inside(root: Path, target: Path) -> bool:
    root, target = Path(os.path.abspath(root)), Path(os.path.abspath(target))
    return target == root or root in target.parents


def _too_big(archive: Path, total: int, limit: int) -> UserError:
    return UserError(
        f"{archive}: unpacks to {total} bytes, more than data.max_unpacked_bytes={limit}; "
        "raise that bound in params.yaml if the archive is genuine"
    )


def extract_archive(archive: Path, target: Path, max_bytes: int) -> None:
    """Extract a zip or tar(.gz) archive into the (new or empty) folder `target`, safely."""
    archive, target = Path(archive), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, target, max_bytes)
        elif tarfile.is_tarfile(archive):
            _extract_tar(archive, target, max_bytes)
        else:
            raise UserError(
                f"{archive}: not a zip or tar archive (truncated or corrupt download); delete it and "
                "rerun `vmddpm download`"
            )
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise UserError(
            f"{archive}: corrupt or truncated archive ({_one_line(e)}); delete it and rerun `vmddpm download`"
        ) from None


def _extract_zip(archive: Path, target: Path, max_bytes: int) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        total = sum(i.file_size for i in infos)
        if total > max_bytes:
            raise _too_big(archive, total, max_bytes)
        for info in infos:
            rel = _check_name(archive, info.filename)
            if stat.S_ISLNK(info.external_attr >> 16):
                link = zf.read(info).decode("utf-8", "replace")
                dest = target / rel
                if PurePosixPath(link).is_absolute() or not _inside(target, dest.parent / link):
                    raise UserError(
                        f"{archive}: link {info.filename!r} -> {link!r} points outside the target folder; "
                        "refusing to extract this archive, get it again from the official source"
                    )
        written = 0
        for info in tqdm(infos, desc=f"extract {archive.name}", unit="file", leave=False):
            dest = target / _check_name(archive, info.filename)
            if info.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            if stat.S_ISLNK(info.external_attr >> 16):
                continue  # checked above; a relative in-tree link is not needed by any layout we read
            dest.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as fin, open(dest, "wb") as fout:
                while block := fin.read(CHUNK):
                    written += len(block)
                    if written > max_bytes:  # the header lied about the sizes
                        raise _too_big(archive, written, max_bytes)
                    fout.write(block)


def _extract_tar(archive: Path, target: Path, max_bytes: int) -> None:
    with tarfile.open(archive, "r:*") as tf:
        members = tf.getmembers()  # reads to the end: a truncated archive fails here
        total = sum(m.size for m in members if m.isfile())
        if total > max_bytes:
            raise _too_big(archive, total, max_bytes)
        for m in members:
            rel = _check_name(archive, m.name)
            if m.issym() or m.islnk():
                base = (target / rel).parent if m.issym() else target
                if PurePosixPath(m.linkname).is_absolute() or not _inside(target, base / m.linkname):
                    raise UserError(
                        f"{archive}: link {m.name!r} -> {m.linkname!r} points outside the target folder; "
                        "refusing to extract this archive, get it again from the official source"
                    )
            elif not (m.isfile() or m.isdir()):
                raise UserError(
                    f"{archive}: entry {m.name!r} is a device or fifo; refusing to extract this archive"
                )
        try:
            tf.extractall(target, members=members, filter="data")  # the stdlib's own guard, too
        except tarfile.FilterError as e:
            raise UserError(f"{archive}: unsafe entry ({_one_line(e)}); refusing to extract") from None


# ------------------------------------------------------------------------------------ raw layouts
def find_root(tree: Path, src: Source) -> Path | None:
    """The raw layout's root at or up to three levels below `tree`: the shallowest folder named
    `src.root` (e.g. `chest_xray`), else the shallowest one holding one of `src.children` (a copy
    whose top folder was renamed, as some mirrors do)."""
    tree = Path(tree)
    if not tree.is_dir():
        return None
    levels = [[tree]] + [
        sorted(p for p in tree.glob("/".join(["*"] * d)) if p.is_dir() and "__MACOSX" not in p.parts)
        for d in range(1, 4)
    ]
    for test in (
        lambda p: p.name == src.root,
        lambda p: any((p / c).is_dir() for c in src.children),
    ):
        for level in levels:
            hits = [p for p in level if test(p)]
            if hits:
                return hits[0]
    return None


def user_path(cfg: Config, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else cfg.root / p


def raw_tree(cfg: Config, dataset: str) -> Path:
    """The folder holding the raw layout root that `prepare` reads (a placed tree or the download)."""
    src = SOURCES[dataset]
    dcfg = cfg.dataset(dataset)
    if dcfg.raw_dir:
        tree = user_path(cfg, dcfg.raw_dir)
        key = f"data.{dataset}.raw_dir"
    else:
        tree = cfg.raw_dir(dataset)
        key = None
        if not (tree / MARKER).is_file():
            raise UserError(
                f"{tree}: no downloaded {dataset} raw data; run `vmddpm download --dataset {dataset}` first"
            )
    root = find_root(tree, src)
    if root is None:
        where = f" (set by {key} in {cfg.origin(key)})" if key else ""
        raise UserError(
            f"{tree}: no {src.root}/ folder found{where}; expected the official layout {src.layout}"
        )
    return root


def gated_error(cfg: Config, dataset: str, src: Source, default_archive: Path) -> UserError:
    return UserError(
        f"{default_archive}: {dataset} is gated and not placed; register and download {src.archive} at "
        f"{src.register_url}, then put it at {default_archive} or set data.{dataset}.archive: PATH "
        f"(or data.{dataset}.raw_dir: PATH of an extracted {src.root}/ tree, "
        f"or data.{dataset}.url: a mirror) "
        f"in {cfg.source}"
    )


def install(
    archive: Path, raw: Path, src: Source, max_bytes: int, meta: dict[str, Any], delete_bad: bool
) -> None:
    """Extract into a temp folder beside `raw`, check the layout, add the marker, swap it into place."""
    try:
        with io.build_folder(raw, tag="extracting") as tmp:
            extract_archive(archive, tmp, max_bytes)
            root = find_root(tmp, src)
            if root is None:
                raise UserError(
                    f"{archive}: has no {src.root}/ folder; expected the official layout {src.layout}"
                )
            log.info("%s: raw tree at %s", src.name, raw / root.relative_to(tmp))
            io.write_json(tmp / MARKER, meta)
    except BaseException:
        if delete_bad:  # not verified by a known checksum, and broken: never keep it as good
            archive.unlink(missing_ok=True)
        raise
