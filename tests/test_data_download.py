"""Download stage: a real HTTP server on 127.0.0.1 serves phantom archives to the real download code.

The server supports Range requests and can drop the connection half-way through a body, so resume,
verification, safe extraction and the idempotency marker are exercised exactly as against a real host.
"""

from __future__ import annotations

import csv
import http.server
import io
import os
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmddpm.data.download import (
    MARKER,
    checksums_path,
    extract_archive,
    fetch,
    read_checksums,
    record_checksum,
)
from vmddpm.data.phantoms import write_phantoms
from vmddpm.data.sources import SOURCES
from vmddpm.errors import UserError
from vmddpm.io import sha256_file
from vmddpm.stages.download import download_dataset
from vmddpm.stages.prepare import prepare_dataset

SMALL = (
    "data.image_size=16",
    "data.phantoms.size=32",
    "data.phantoms.depth=8",
    "data.phantoms.acdc_slices=3",
    "data.phantoms.acdc_frames=4",
    "data.phantoms.chestxray_subjects=12",
    "data.phantoms.brats2018_subjects=6",
    "data.phantoms.acdc_subjects=6",
    "data.download_retries=4",
    "data.download_backoff_s=0.01",
    "data.download_timeout_s=10",
)


class Server:
    """What the handler saw, and how it should misbehave."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.drop_first = 0  # drop this many full-body responses half-way
        self.requests: list[str | None] = []  # the Range header of every GET


def _handler(state: Server) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            rng = self.headers.get("Range")
            state.requests.append(rng)
            path = state.root / self.path.lstrip("/")
            if not path.is_file():
                self.send_error(404)
                return
            data = path.read_bytes()
            start = int(rng.split("=")[1].split("-")[0]) if rng else 0
            if start >= len(data) and rng:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            body = data[start:]
            self.send_response(206 if rng else 200)
            if rng:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if not rng and state.drop_first > 0:
                state.drop_first -= 1
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

    return Handler


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[Server, str]]:
    root = tmp_path / "www"
    root.mkdir()
    state = Server(root)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield state, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------------------ acceptance 1
def test_loopback_download_resumes_verifies_extracts_and_prepares(make_cfg, server, tmp_path) -> None:
    state, base = server
    dataset = "acdc"
    cfg0 = make_cfg(*SMALL)
    archive = write_phantoms(cfg0, dataset, tmp_path / "ph", archive=True)
    (state.root / archive.name).write_bytes(archive.read_bytes())
    sha = sha256_file(archive)
    # the official checksum, as if recorded by an earlier verified download
    record_checksum(checksums_path(cfg0), f"{dataset}/{archive.name}", sha)
    cfg = make_cfg(*SMALL, f"data.{dataset}.source=official", f"data.{dataset}.url={base}/{archive.name}")
    state.drop_first = 1

    raw = download_dataset(cfg, dataset)

    assert state.requests[0] is None and state.requests[1] is not None  # dropped, then resumed
    offset = int(state.requests[1].split("=")[1].rstrip("-"))
    assert 0 < offset < archive.stat().st_size
    got = raw.parent / "archives" / dataset / SOURCES[dataset].archive
    assert sha256_file(got) == sha and not got.with_name(got.name + ".part").exists()
    assert (raw / MARKER).is_file() and (raw / "database" / "training").is_dir()

    out = prepare_dataset(cfg, dataset)
    with (out / "manifest.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert rows and list(rows[0]) == ["file", "subject", "split", "source", "slice"]
    split_of: dict[str, set[str]] = {}
    for r in rows:
        split_of.setdefault(r["subject"], set()).add(r["split"])
        assert (out / r["file"]).is_file()
    assert all(len(s) == 1 for s in split_of.values()), "a subject is in two splits"
    assert {r["split"] for r in rows} == {"train", "val", "test"}

    # a second download is a no-op: no new request, the extracted tree untouched
    n_req, mtime = len(state.requests), (raw / MARKER).stat().st_mtime_ns
    download_dataset(cfg, dataset)
    assert len(state.requests) == n_req and (raw / MARKER).stat().st_mtime_ns == mtime


def test_checksum_mismatch_deletes_the_bad_file_and_keeps_the_good_tree(make_cfg, server, tmp_path) -> None:
    state, base = server
    cfg0 = make_cfg(*SMALL)
    archive = write_phantoms(cfg0, "chestxray", tmp_path / "ph", archive=True)
    (state.root / archive.name).write_bytes(archive.read_bytes())
    cfg = make_cfg(*SMALL)  # a finished phantom download that must survive
    raw = download_dataset(cfg, "chestxray")
    before = sorted(p.relative_to(raw) for p in raw.rglob("*"))
    dest = raw.parent / "archives" / "chestxray" / "ChestXRay2017.zip"
    record_checksum(checksums_path(cfg), "chestxray/ChestXRay2017.zip", "0" * 64)
    bad = make_cfg(*SMALL, "data.chestxray.source=official", f"data.chestxray.url={base}/{archive.name}")
    with pytest.raises(UserError) as e:
        download_dataset(bad, "chestxray")
    msg = _one_line(e)
    assert "sha256" in msg and str(dest) in msg and "0" * 64 in msg and "deleted" in msg
    assert not dest.exists() and not dest.with_name(dest.name + ".part").exists()  # not kept as good
    assert sorted(p.relative_to(raw) for p in raw.rglob("*")) == before


def test_first_official_download_records_then_enforces_checksum(make_cfg, server, tmp_path) -> None:
    state, base = server
    cfg0 = make_cfg(*SMALL)
    archive = write_phantoms(cfg0, "chestxray", tmp_path / "ph", archive=True)
    (state.root / "a.zip").write_bytes(archive.read_bytes())
    cfg = make_cfg(*SMALL, "data.chestxray.source=official", f"data.chestxray.url={base}/a.zip")
    download_dataset(cfg, "chestxray")
    assert read_checksums(checksums_path(cfg)) == {"chestxray/ChestXRay2017.zip": sha256_file(archive)}
    # the host now serves other bytes: refused, and the verified tree stays
    (state.root / "a.zip").write_bytes(archive.read_bytes()[:-10] + b"x" * 10)
    (cfg.raw_dir("chestxray").parent / "archives" / "chestxray" / "ChestXRay2017.zip").unlink()
    (cfg.raw_dir("chestxray") / MARKER).unlink()
    with pytest.raises(UserError, match="does not match"):
        download_dataset(cfg, "chestxray")


def test_fetch_gives_up_with_one_line_after_retries(server, tmp_path) -> None:
    _, base = server
    with pytest.raises(UserError) as e:
        fetch(
            f"{base}/missing.zip", tmp_path / "m.zip", sha256=None, size=None, timeout=5, retries=1, backoff=0
        )
    assert "404" in _one_line(e) and not (tmp_path / "m.zip").exists()


# ------------------------------------------------------------------------------ bad archives
def _zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def test_truncated_archive_is_refused_naming_it(make_cfg, server, tmp_path) -> None:
    state, base = server
    cfg = make_cfg(*SMALL)
    raw = download_dataset(cfg, "chestxray")  # a finished download that must survive
    before = {p: p.stat().st_mtime_ns for p in raw.rglob("*")}
    archive = cfg.phantom_dir("chestxray") / "ChestXRay2017.zip"
    cut = tmp_path / "cut.zip"
    cut.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    bad = make_cfg(*SMALL, "data.chestxray.source=official", f"data.chestxray.archive={cut}")
    with pytest.raises(UserError) as e:
        download_dataset(bad, "chestxray")
    assert str(cut) in _one_line(e) and "truncated" in str(e.value)
    assert cut.is_file()  # a user's own file is never deleted
    assert {p: p.stat().st_mtime_ns for p in raw.rglob("*")} == before
    assert not list(raw.parent.glob(".*extracting"))
    # served truncated by a host with no known checksum: the download is not kept as good
    (state.root / "cut.zip").write_bytes(cut.read_bytes())
    served = make_cfg(*SMALL, "data.chestxray.source=official", f"data.chestxray.url={base}/cut.zip")
    with pytest.raises(UserError) as e:
        download_dataset(served, "chestxray")
    dest = raw.parent / "archives" / "chestxray" / "ChestXRay2017.zip"
    assert str(dest) in _one_line(e) and not dest.exists()
    assert "chestxray/ChestXRay2017.zip" not in read_checksums(checksums_path(cfg))  # nothing recorded
    assert {p: p.stat().st_mtime_ns for p in raw.rglob("*")} == before


def test_truncated_tar_gz_is_refused(tmp_path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        data = os.urandom(200_000)
        info = tarfile.TarInfo("database/x.bin")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(buf.getvalue()[:50_000])
    with pytest.raises(UserError) as e:
        extract_archive(cut, tmp_path / "out", 10**9)
    assert str(cut) in _one_line(e)


def test_zip_entry_with_dotdot_is_refused(make_cfg, tmp_path) -> None:
    evil = _zip(tmp_path / "evil.zip", {"chest_xray/train/NORMAL/a.jpeg": b"x", "../../escape.txt": b"owned"})
    raw = download_dataset(make_cfg(*SMALL), "chestxray")  # finished outputs that must survive
    before = {p: p.stat().st_mtime_ns for p in raw.rglob("*")}
    cfg = make_cfg(*SMALL, "data.chestxray.source=official", f"data.chestxray.archive={evil}")
    with pytest.raises(UserError) as e:
        download_dataset(cfg, "chestxray")
    msg = _one_line(e)
    assert str(evil) in msg and "../../escape.txt" in msg
    assert not list(tmp_path.rglob("escape.txt"))
    assert {p: p.stat().st_mtime_ns for p in raw.rglob("*")} == before
    with pytest.raises(UserError, match="outside"):
        extract_archive(_zip(tmp_path / "abs.zip", {"/etc/evil": b"x"}), tmp_path / "o2", 10**9)


def test_tar_symlink_escaping_the_target_is_refused(tmp_path) -> None:
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tf:
        link = tarfile.TarInfo("database/link")
        link.type, link.linkname = tarfile.SYMTYPE, "../../../etc"
        tf.addfile(link)
        f = tarfile.TarInfo("database/link/passwd")
        f.size = 1
        tf.addfile(f, io.BytesIO(b"x"))
    target = tmp_path / "out"
    with pytest.raises(UserError) as e:
        extract_archive(evil, target, 10**9)
    assert str(evil) in _one_line(e) and "database/link" in str(e.value)
    assert not (target / "database" / "link").exists()


def test_archive_larger_than_the_bound_is_refused(tmp_path) -> None:
    bomb = _zip(tmp_path / "bomb.zip", {"database/zeros": b"\0" * 100_000})
    with pytest.raises(UserError) as e:
        extract_archive(bomb, tmp_path / "out", 50_000)
    assert str(bomb) in _one_line(e) and "max_unpacked_bytes" in str(e.value)


def test_gated_dataset_not_placed_says_where_to_get_and_put_it(make_cfg, cli, tmp_path) -> None:
    cfg = make_cfg("data.brats2018.source=official")
    with pytest.raises(UserError) as e:
        download_dataset(cfg, "brats2018")
    msg = _one_line(e)
    where = cfg.raw_dir("brats2018").parent / "archives" / "brats2018" / "MICCAI_BraTS_2018_Data_Training.zip"
    assert SOURCES["brats2018"].register_url in msg and str(where) in msg
    assert "data.brats2018.archive" in msg and "data.brats2018.raw_dir" in msg
    proc = cli("download", "--dataset", "brats2018", "--scale", "paper", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and "registration" in lines[0] and "MICCAI_BraTS_2018_Data_Training.zip" in lines[0]
    )


def test_gated_dataset_placed_archive_and_raw_dir_are_honoured(make_cfg, tmp_path) -> None:
    cfg = make_cfg(*SMALL)
    archive = write_phantoms(cfg, "brats2018", tmp_path / "kaggle", archive=True)
    placed = make_cfg(*SMALL, "data.brats2018.source=official", f"data.brats2018.archive={archive}")
    raw = download_dataset(placed, "brats2018")
    assert (raw / "MICCAI_BraTS_2018_Data_Training" / "HGG").is_dir()
    assert read_checksums(checksums_path(cfg))[
        "brats2018/MICCAI_BraTS_2018_Data_Training.zip"
    ] == sha256_file(archive)
    tree = make_cfg(*SMALL, "data.brats2018.source=official", f"data.brats2018.raw_dir={tmp_path / 'kaggle'}")
    assert download_dataset(tree, "brats2018") == tmp_path / "kaggle"
    assert (prepare_dataset(tree, "brats2018") / "manifest.csv").is_file()


def test_zip_symlink_and_tar_hardlink_leaving_the_target_are_refused(tmp_path) -> None:
    evil = tmp_path / "link.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        info = zipfile.ZipInfo("database/up")
        info.external_attr = (0o120777 << 16) | 0x20  # a symlink entry, as `zip --symlinks` writes
        zf.writestr(info, "../../outside")
    with pytest.raises(UserError) as e:
        extract_archive(evil, tmp_path / "out", 10**9)
    assert str(evil) in _one_line(e) and "database/up" in str(e.value)
    hard = tmp_path / "hard.tar"
    with tarfile.open(hard, "w") as tf:
        info = tarfile.TarInfo("database/passwd")
        info.type, info.linkname = tarfile.LNKTYPE, "../etc/passwd"
        tf.addfile(info)
    with pytest.raises(UserError, match="outside"):
        extract_archive(hard, tmp_path / "out2", 10**9)


def test_a_partial_file_from_an_earlier_run_is_resumed(make_cfg, server, tmp_path) -> None:
    state, base = server
    cfg = make_cfg(*SMALL)
    archive = write_phantoms(cfg, "acdc", tmp_path / "ph", archive=True)
    (state.root / "ACDC.zip").write_bytes(archive.read_bytes())
    dest = tmp_path / "dl" / "ACDC.zip"
    dest.parent.mkdir()
    half = archive.stat().st_size // 3
    dest.with_name("ACDC.zip.part").write_bytes(archive.read_bytes()[:half])  # killed earlier
    sha = sha256_file(archive)
    got = fetch(f"{base}/ACDC.zip", dest, sha256=sha, size=None, timeout=5, retries=0, backoff=0)
    assert got == sha and sha256_file(dest) == sha
    assert state.requests == [f"bytes={half}-"]


def test_gated_archive_at_the_default_place_is_found(make_cfg, tmp_path) -> None:
    cfg = make_cfg(*SMALL, "data.brats2018.source=official")
    archive = write_phantoms(cfg, "brats2018", tmp_path / "ph", archive=True)
    where = cfg.raw_dir("brats2018").parent / "archives" / "brats2018" / archive.name
    where.parent.mkdir(parents=True)
    where.write_bytes(archive.read_bytes())
    raw = download_dataset(cfg, "brats2018")
    assert (raw / "MICCAI_BraTS_2018_Data_Training" / "LGG").is_dir() and where.is_file()


def test_a_renamed_top_folder_is_found_by_its_children(make_cfg, tmp_path) -> None:
    cfg = make_cfg(*SMALL)
    write_phantoms(cfg, "acdc", tmp_path / "ph", archive=False)
    (tmp_path / "ph" / "database").rename(tmp_path / "ph" / "ACDC_renamed")
    placed = make_cfg(*SMALL, "data.acdc.source=official", f"data.acdc.raw_dir={tmp_path / 'ph'}")
    rows = (prepare_dataset(placed, "acdc") / "manifest.csv").read_text().splitlines()
    assert len(rows) - 1 == 6 * 2 * 3 and "ACDC_renamed/training/patient001" in rows[1]


def test_an_archive_without_the_official_layout_replaces_nothing(make_cfg, tmp_path) -> None:
    raw = download_dataset(make_cfg(*SMALL), "acdc")
    before = {p: p.stat().st_mtime_ns for p in raw.rglob("*")}
    other = _zip(tmp_path / "other.zip", {"something/else.txt": b"x"})
    with pytest.raises(UserError) as e:
        download_dataset(make_cfg(*SMALL, "data.acdc.source=official", f"data.acdc.archive={other}"), "acdc")
    assert str(other) in _one_line(e) and "database/" in str(e.value)
    assert {p: p.stat().st_mtime_ns for p in raw.rglob("*")} == before
