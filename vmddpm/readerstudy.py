"""Blinded real-vs-synthetic reader study: make a study kit, then score the readers' answers.

The paper's qualitative claim (radiologists find the synthetic images hard to tell from real ones)
rests on a reader study. This module makes that study repeatable by any group with its own readers.

`make_study` writes a study folder::

    <out>/study.json          what was drawn: dataset, model, seed, counts, image ids in display order,
                              sha256 of key.csv, the vmddpm version that made it
    <out>/key.csv             the sealed key: image id -> real/synthetic and the source file
    <out>/reader/index.html   the page readers open (from file://, no server, no network)
    <out>/reader/images/      img_0001.png ... in display order; which is real is random under the seed

Why it is built this way:

* Only `reader/` goes to the readers, and nothing in it says which image is real: opaque ids in a
  random order, the images re-encoded without metadata (a PNG text chunk or a file name could leak
  the source), and the page embeds image ids only. The key stays with the organiser.
* The key's sha256 is recorded in `study.json`, so `score_study` refuses a key that was edited after
  the study was made (a silent change would change every score).
* The page keeps answers in the browser's localStorage under the study id and reader id, so a reload
  or a closed tab loses nothing; answer files carry the study id, so an answer file from another
  study (whose image ids look the same) is refused instead of scored against the wrong key.
* The study folder is built in a temporary folder and renamed into place: a crash leaves no
  half-made study, and an existing study (its key and the answers collected for it) is never
  overwritten.
* Agreement statistics (Cohen's and Fleiss' kappa) are computed with exact rational arithmetic: they
  are a few lines, and exactness makes them checkable against hand-worked examples.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import secrets
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fractions import Fraction
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from vmddpm import __version__
from vmddpm import io as vio
from vmddpm.config import DEMO_LABEL, Config
from vmddpm.errors import UserError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
REAL, SYNTHETIC = "real", "synthetic"
TRUTHS = (REAL, SYNTHETIC)
KEY_COLUMNS = ("image_id", "truth", "source")
ANSWER_COLUMNS = ("study", "reader", "image_id", "answer", "realism", "plausibility", "timestamp")
RATINGS = ("realism", "plausibility")
RATING_RANGE = range(1, 6)
CHANCE = 0.5  # a reader who guesses (or answers by coin flip) is right half the time
STUDY_JSON, KEY_CSV, READER_DIR, IMAGES_DIR = "study.json", "key.csv", "reader", "images"
PAGE = "readerstudy_page.html"
MAX_LISTED = 10  # problems named in one error line; the rest are counted


# ============================================================================================= make
def make_study(
    cfg: Config,
    dataset: str,
    model: str,
    n_real: int,
    n_fake: int,
    seed: int | None,
    out: str | Path,
    samples: str | Path | None = None,
) -> Path:
    """Draw `n_real` real test images and `n_fake` generated ones, shuffle them under `seed`, and
    write a blinded study kit to `out` (see the module docstring). Returns `out`.

    Real images come from the `test` split of the prepared dataset's manifest (the images no model
    was trained on); generated ones from `samples` (default: the sample stage's folder).
    """
    from vmddpm.data.dataset import read_manifest  # imports torch: keep `score` free of it

    cfg.dataset(dataset)  # unknown dataset -> one-line error naming params.yaml
    cfg.preset(model)
    seed = cfg.seed if seed is None else int(seed)
    if n_real < 1 or n_fake < 1:
        raise UserError(
            f"--n-real ({n_real}) and --n-fake ({n_fake}) must both be at least 1: sensitivity and "
            "specificity need real and synthetic images"
        )
    out = Path(out)
    _refuse_existing(out)

    prepared = cfg.prepared_dir(dataset)
    manifest = prepared / "manifest.csv"
    test_files = sorted(prepared / r["file"] for r in read_manifest(prepared) if r["split"] == "test")
    if len(test_files) < n_real:
        raise UserError(
            f"{manifest}: the test split has {len(test_files)} images but --n-real is {n_real}; "
            f"ask for fewer, or prepare more subjects (data.{dataset}.max_subjects, data.split.test)"
        )
    samples = Path(samples) if samples is not None else cfg.samples_dir(dataset, model)
    fake_files = sorted(samples.glob("*.png")) if samples.is_dir() else []
    if len(fake_files) < n_fake:
        raise UserError(
            f"{samples}: {len(fake_files)} generated PNGs but --n-fake is {n_fake}; run "
            f"`vmddpm sample --dataset {dataset} --model {model}` (with sample.n_images >= {n_fake})"
        )

    rng = np.random.default_rng(seed)
    real = [test_files[i] for i in sorted(rng.choice(len(test_files), n_real, replace=False))]
    fake = [fake_files[i] for i in sorted(rng.choice(len(fake_files), n_fake, replace=False))]
    items = [(REAL, p) for p in real] + [(SYNTHETIC, p) for p in fake]
    items = [items[i] for i in rng.permutation(len(items))]
    width = max(4, len(str(len(items))))
    ids = [f"img_{i + 1:0{width}d}" for i in range(len(items))]

    study_id = secrets.token_hex(8)  # random: two studies never share a reader's stored answers
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        looks: dict[str, set[tuple[str, tuple[int, int]]]] = {REAL: set(), SYNTHETIC: set()}
        for image_id, (truth, src) in zip(ids, items, strict=True):
            looks[truth].add(_copy_png(src, tmp / READER_DIR / IMAGES_DIR / f"{image_id}.png"))
        if looks[REAL] != looks[SYNTHETIC]:
            log.warning(
                "real images are %s but synthetic ones %s (mode, size): readers may tell them apart "
                "by that alone",
                sorted(looks[REAL]),
                sorted(looks[SYNTHETIC]),
            )
        key_text = _csv_text(
            KEY_COLUMNS,
            [(i, truth, _display_path(src, cfg.root)) for i, (truth, src) in zip(ids, items, strict=True)],
        )
        vio.write_text(tmp / KEY_CSV, key_text)
        meta = {
            "format": FORMAT_VERSION,
            "study_id": study_id,
            "dataset": dataset,
            "model": model,
            "scale": cfg.scale,
            "seed": seed,
            "n_real": n_real,
            "n_fake": n_fake,
            "images": ids,
            "key_sha256": hashlib.sha256(key_text.encode()).hexdigest(),
            "real_source": str(manifest),
            "fake_source": str(samples),
            "created_by": f"vmddpm {__version__}",
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        vio.write_json(tmp / STUDY_JSON, meta)
        vio.write_text(tmp / READER_DIR / "index.html", _page(meta))
        os.chmod(tmp, 0o777 & ~vio._UMASK)  # mkdtemp makes 0700; the study folder gets the usual mode
        if out.is_dir():
            out.rmdir()  # empty (checked above); rename(2) also replaces an empty folder, but be plain
        os.rename(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _occupied(out):  # someone else wrote there meanwhile
            raise UserError(f"{out}: appeared while the study was being made; nothing written") from e
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "reader study %s: %d real + %d synthetic images (seed %d) -> %s; give readers %s, keep %s private",
        study_id,
        n_real,
        n_fake,
        seed,
        out,
        out / READER_DIR,
        out / KEY_CSV,
    )
    return out


def _occupied(out: Path) -> bool:
    return out.exists() and (not out.is_dir() or any(out.iterdir()))


def _refuse_existing(out: Path) -> None:
    if _occupied(out):
        raise UserError(
            f"{out}: already exists and is not empty; a study is never overwritten (its key and the "
            "answers collected for it belong to it): choose another --out or remove it"
        )


def _copy_png(src: Path, dst: Path) -> tuple[str, tuple[int, int]]:
    """Re-encode `src` as a PNG without metadata (text chunks, ICC profiles, names could leak the
    source); returns (mode, size) so the caller can warn when real and synthetic images differ."""
    try:
        with Image.open(src) as im:
            im.load()
            if im.mode not in ("1", "L", "LA", "I", "I;16", "RGB", "RGBA"):
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            clean = Image.frombytes(im.mode, im.size, im.tobytes())
    except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
        raise UserError(f"{src}: cannot read the image ({e})") from None
    with vio.atomic_path(dst) as tmp:
        clean.save(tmp, format="PNG")
    return clean.mode, clean.size


def _display_path(path: Path, root: Path) -> str:
    """Path relative to the project root when inside it (a key stays valid if the repo moves)."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def _csv_text(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    w.writerows(rows)
    return buf.getvalue()


def _page(meta: dict[str, Any]) -> str:
    """The reader page with the study embedded: ids and relative image paths, never the key."""
    data = {
        "study_id": meta["study_id"],
        "title": f"Reader study: {meta['dataset']} ({len(meta['images'])} images)",
        "images": [{"id": i, "src": f"{IMAGES_DIR}/{i}.png"} for i in meta["images"]],
        "version": meta["created_by"],
    }
    # JSON inside <script>: escape <, > and & so no value can close the tag
    text = json.dumps(data).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    template = resources.files("vmddpm").joinpath(PAGE).read_text(encoding="utf-8")
    return template.replace("__STUDY_JSON__", text)


# ============================================================================================ score
@dataclass
class ReaderAnswers:
    """One reader's validated answer file: image id -> (answer, realism, plausibility)."""

    reader: str
    path: Path
    sha256: str
    answers: dict[str, str] = field(default_factory=dict)
    ratings: dict[str, dict[str, int]] = field(default_factory=dict)  # rating name -> id -> 1..5


def score_study(cfg: Config, study: str | Path, answers: Sequence[str | Path]) -> Path:
    """Score readers' answer files against the sealed key of `study`; write `scores.json`,
    `summary.md` and `scores.png` into the study folder and return the path of `scores.json`.

    Every file is validated first (the key against its recorded sha256; each answer file against
    the study's ids), so a wrong input stops with a message naming the file and rows instead of
    silently producing a plausible-looking score. `cfg` is not read: the study folder records
    everything scoring needs, so a study scores the same under any params.yaml.
    """
    folder = Path(study)
    if folder.name == STUDY_JSON:
        folder = folder.parent
    meta = read_study(folder)
    key = read_key(folder, meta)
    readers = [read_answers(Path(p), meta) for p in answers]
    if not readers:
        raise UserError("no answer files given: pass --answers A.csv [B.csv ...]")
    seen: dict[str, Path] = {}
    for r in readers:
        if r.reader in seen:
            raise UserError(
                f"{r.path}: reader '{r.reader}' also answered in {seen[r.reader]}; one file per reader"
            )
        seen[r.reader] = r.path

    ids = meta["images"]
    per_reader = [reader_scores(r, key) for r in readers]
    agreement = agreement_scores([r.reader for r in readers], [[r.answers[i] for i in ids] for r in readers])
    scores = {
        "format": FORMAT_VERSION,
        "study_id": meta["study_id"],
        "dataset": meta["dataset"],
        "model": meta["model"],
        "scale": meta.get("scale"),
        "seed": meta["seed"],
        "n_real": meta["n_real"],
        "n_fake": meta["n_fake"],
        "key_sha256": meta["key_sha256"],
        "positive_class": SYNTHETIC,
        "chance": CHANCE,
        "readers": per_reader,
        "agreement": agreement,
        "scored_by": f"vmddpm {__version__}",
        "scored_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    _figure(scores, folder / "scores.png")
    vio.write_text(folder / "summary.md", summary_markdown(scores))
    path = vio.write_json(folder / "scores.json", _json_safe(scores))  # last: it marks a finished scoring
    for r in per_reader:
        log.info(
            "reader %s: accuracy %.3f (binomial p=%.3g vs %.1f), sensitivity %s, specificity %s",
            r["reader"],
            r["accuracy"],
            r["binom_p"],
            CHANCE,
            _fmt(r["sensitivity"]),
            _fmt(r["specificity"]),
        )
    if agreement["method"]:
        log.info(
            "agreement (%s kappa, %d readers): %s",
            agreement["method"],
            len(readers),
            _fmt(agreement["kappa"]),
        )
    log.info("summary: %s", folder / "summary.md")
    return path


def read_study(folder: Path) -> dict[str, Any]:
    """`study.json` of a study folder, with the keys the scorer relies on checked."""
    path = folder / STUDY_JSON
    if not path.is_file():
        raise UserError(
            f"{folder}: not a reader study (no {STUDY_JSON}); make one with `vmddpm reader-study make`"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    need = ("study_id", "dataset", "model", "seed", "n_real", "n_fake", "images", "key_sha256")
    missing = [k for k in need if k not in meta]
    if missing:
        raise UserError(f"{path}: missing {', '.join(missing)}; was it made by `vmddpm reader-study make`?")
    if (
        len(set(meta["images"])) != len(meta["images"])
        or len(meta["images"]) != meta["n_real"] + meta["n_fake"]
    ):
        raise UserError(
            f"{path}: images do not match n_real + n_fake or repeat an id; the study file was edited"
        )
    return meta


def read_key(folder: Path, meta: dict[str, Any]) -> dict[str, str]:
    """The sealed key (image id -> real/synthetic), refused unless its sha256 is the recorded one."""
    path = folder / KEY_CSV
    if not path.is_file():
        raise UserError(f"{path}: the study's key is missing")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != meta["key_sha256"]:
        raise UserError(
            f"{path}: sha256 {digest[:12]}… is not the {meta['key_sha256'][:12]}… recorded in "
            f"{folder / STUDY_JSON}: the key was changed after the study was made; restore the original"
        )
    rows = list(csv.DictReader(io.StringIO(data.decode("utf-8"))))
    key = {r["image_id"]: r["truth"] for r in rows}
    if sorted(key) != sorted(meta["images"]) or set(key.values()) - set(TRUTHS):
        raise UserError(f"{path}: does not match the images of {folder / STUDY_JSON}")
    return key


def read_answers(path: Path, meta: dict[str, Any]) -> ReaderAnswers:
    """Validate one reader's answer file against the study and return its answers.

    Every problem is collected and reported at once (file, line numbers, ids), so a reader's file
    can be fixed in one go: unknown or foreign ids, duplicates, missing images, bad values.
    """
    if not path.is_file():
        raise UserError(f"{path}: answer file not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a spreadsheet may have added a byte-order mark
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file; export the answers as CSV") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = tuple(c.strip() for c in reader.fieldnames or ())
    if sorted(columns) != sorted(ANSWER_COLUMNS):
        raise UserError(
            f"{path}: columns {list(columns)} are not {list(ANSWER_COLUMNS)}; "
            "use the file the study page downloads"
        )
    reader.fieldnames = list(columns)
    rows: list[tuple[int, dict[str, str]]] = []
    ragged: list[str] = []
    for row in reader:
        if None in row:  # more values than columns (DictReader's restkey)
            ragged.append(f"line {reader.line_num}: more values than columns")
            continue
        rows.append((reader.line_num, {k: (v or "").strip() for k, v in row.items()}))
    if not rows and not ragged:
        raise UserError(f"{path}: no answers in the file")

    study_id = meta["study_id"]
    others = {r["study"] for _, r in rows} - {study_id}
    if others and all(r["study"] != study_id for _, r in rows):
        raise UserError(
            f"{path}: answers are for study {', '.join(sorted(others))}, not {study_id} "
            f"({STUDY_JSON}): this answer file belongs to another study"
        )
    known = set(meta["images"])
    problems: list[str] = list(ragged)
    names = {r["reader"] for _, r in rows}
    if len(names) != 1 or "" in names:
        problems.append(f"reader column must hold one non-empty id (found {sorted(names)})")
    first_line: dict[str, int] = {}
    out = ReaderAnswers(reader=min(names, default=""), path=path, sha256=hashlib.sha256(raw).hexdigest())
    out.ratings = {k: {} for k in RATINGS}
    for line, r in rows:
        image_id = r["image_id"]
        if r["study"] != study_id:
            problems.append(f"line {line}: study '{r['study']}' is not {study_id}")
        if image_id not in known:
            problems.append(f"line {line}: unknown image id '{image_id}'")
            continue
        if image_id in first_line:
            problems.append(
                f"line {line}: duplicate answer for {image_id} (first on line {first_line[image_id]})"
            )
            continue
        first_line[image_id] = line
        answer = r["answer"].lower()
        if answer not in TRUTHS:
            problems.append(f"line {line}: answer '{r['answer']}' is not real or synthetic")
        out.answers[image_id] = answer
        for k in RATINGS:
            try:
                value = int(r[k])
            except ValueError:
                value = 0
            if value not in RATING_RANGE:
                problems.append(f"line {line}: {k} '{r[k]}' is not an integer 1-5")
            out.ratings[k][image_id] = value
    missing = [i for i in meta["images"] if i not in first_line]
    if missing:
        problems.append(f"missing answers for {len(missing)} image(s): {_listed(missing)}")
    if problems:
        more = f" (and {len(problems) - MAX_LISTED} more problems)" if len(problems) > MAX_LISTED else ""
        raise UserError(f"{path}: {'; '.join(problems[:MAX_LISTED])}{more}")
    return out


def _listed(items: Sequence[str]) -> str:
    head = ", ".join(items[:MAX_LISTED])
    return head + (f" (and {len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else "")


# ------------------------------------------------------------------------------------- statistics
def reader_scores(r: ReaderAnswers, key: dict[str, str]) -> dict[str, Any]:
    """Accuracy, sensitivity and specificity for "synthetic" (the positive class), an exact
    two-sided binomial test of the accuracy against chance, and mean ratings per true class."""
    from scipy.stats import binomtest

    tp = sum(1 for i, t in key.items() if t == SYNTHETIC and r.answers[i] == SYNTHETIC)
    fn = sum(1 for i, t in key.items() if t == SYNTHETIC and r.answers[i] == REAL)
    tn = sum(1 for i, t in key.items() if t == REAL and r.answers[i] == REAL)
    fp = sum(1 for i, t in key.items() if t == REAL and r.answers[i] == SYNTHETIC)
    n, correct = len(key), tp + tn
    test = binomtest(correct, n, CHANCE, alternative="two-sided")
    ci = test.proportion_ci(confidence_level=0.95, method="exact")
    sens = tp / (tp + fn) if tp + fn else None
    spec = tn / (tn + fp) if tn + fp else None
    means: dict[str, dict[str, float | None]] = {}
    for k in RATINGS:
        means[k] = {}
        for truth in TRUTHS:
            vals = [v for i, v in r.ratings[k].items() if key[i] == truth]
            means[k][truth] = float(np.mean(vals)) if vals else None
    return {
        "reader": r.reader,
        "file": str(r.path),
        "file_sha256": r.sha256,
        "n": n,
        "correct": correct,
        "tp": tp,
        "fn": fn,
        "tn": tn,
        "fp": fp,
        "accuracy": correct / n,
        "accuracy_ci95": [float(ci.low), float(ci.high)],
        "balanced_accuracy": (sens + spec) / 2 if sens is not None and spec is not None else None,
        "sensitivity": sens,
        "specificity": spec,
        "binom_p": float(test.pvalue),
        "realism": means["realism"],
        "plausibility": means["plausibility"],
    }


def cohen_kappa(a: Sequence[str], b: Sequence[str]) -> Fraction | None:
    """Cohen's kappa of two raters' labels of the same items, exactly; None when undefined (both
    raters give one and the same label to every item, so chance agreement is already 1)."""
    if len(a) != len(b) or not a:
        raise ValueError("two raters need the same, non-zero number of items")
    n = len(a)
    p_o = Fraction(sum(x == y for x, y in zip(a, b, strict=True)), n)
    ca, cb = Counter(a), Counter(b)
    p_e = sum((Fraction(ca[c], n) * Fraction(cb[c], n) for c in set(ca) | set(cb)), Fraction(0))
    return None if p_e == 1 else (p_o - p_e) / (1 - p_e)


def fleiss_kappa(labels: Sequence[Sequence[str]]) -> Fraction | None:
    """Fleiss' kappa of m >= 2 raters (rows: raters; columns: the same items), exactly; None when
    undefined (every rating is the same category)."""
    m = len(labels)
    if m < 2 or any(len(r) != len(labels[0]) for r in labels) or not labels[0]:
        raise ValueError("Fleiss' kappa needs >= 2 raters with the same, non-zero number of items")
    n_items = len(labels[0])
    counts = [Counter(r[i] for r in labels) for i in range(n_items)]  # n_ij per item
    categories = set().union(*counts)
    p_bar = sum((Fraction(sum(c * c for c in cnt.values()) - m, m * (m - 1)) for cnt in counts), Fraction(0))
    p_bar /= n_items
    p_j = {c: Fraction(sum(cnt[c] for cnt in counts), n_items * m) for c in categories}
    p_e = sum((p * p for p in p_j.values()), Fraction(0))
    return None if p_e == 1 else (p_bar - p_e) / (1 - p_e)


def agreement_scores(readers: Sequence[str], labels: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Cohen's kappa for two readers, Fleiss' kappa for three or more (and, from two readers on,
    Cohen's kappa of every pair, which shows who disagrees with whom)."""
    k = len(readers)
    pairs = [
        {"a": readers[i], "b": readers[j], "kappa": _float(cohen_kappa(labels[i], labels[j]))}
        for i in range(k)
        for j in range(i + 1, k)
    ]
    if k < 2:
        return {"method": None, "kappa": None, "n_readers": k, "pairwise_cohen": pairs}
    kappa = cohen_kappa(labels[0], labels[1]) if k == 2 else fleiss_kappa(labels)
    return {
        "method": "cohen" if k == 2 else "fleiss",
        "kappa": _float(kappa),
        "n_readers": k,
        "pairwise_cohen": pairs,
    }


def _float(x: Fraction | None) -> float | None:
    return None if x is None else float(x)


def _json_safe(obj: Any) -> Any:
    """NaN never reaches JSON (it is not JSON): undefined numbers are null."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and obj != obj:
        return None
    return obj


# ---------------------------------------------------------------------------------------- outputs
def _fmt(x: float | None, digits: int = 3) -> str:
    return "undefined" if x is None else f"{x:.{digits}f}"


def summary_markdown(s: dict[str, Any]) -> str:
    """A human-readable summary of `scores.json` (the numbers are the same, rounded)."""
    demo = s.get("scale") == "demo"
    lines = [f"# Reader study {s['study_id']}: {s['dataset']} / {s['model']}", ""]
    if demo:
        lines += [f"**{DEMO_LABEL}** (phantom data, demo-scale model)", ""]
    lines += [
        f"{s['n_real'] + s['n_fake']} images: {s['n_real']} real (test split), {s['n_fake']} synthetic; "
        f"seed {s['seed']}; key sha256 `{s['key_sha256'][:16]}…` verified. Positive class: synthetic.",
        "",
        "| reader | accuracy (95% CI) | binomial p vs 0.5 | sensitivity | specificity | "
        "realism real / synthetic | plausibility real / synthetic |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in s["readers"]:
        lo, hi = r["accuracy_ci95"]
        lines.append(
            f"| {r['reader']} | {r['accuracy']:.3f} ({lo:.3f}–{hi:.3f}) | {r['binom_p']:.3g} | "
            f"{_fmt(r['sensitivity'])} | {_fmt(r['specificity'])} | "
            f"{_fmt(r['realism'][REAL], 2)} / {_fmt(r['realism'][SYNTHETIC], 2)} | "
            f"{_fmt(r['plausibility'][REAL], 2)} / {_fmt(r['plausibility'][SYNTHETIC], 2)} |"
        )
    a = s["agreement"]
    lines.append("")
    if a["method"] == "cohen":
        lines.append(f"Inter-reader agreement on real/synthetic: Cohen's kappa = {_fmt(a['kappa'])}.")
    elif a["method"] == "fleiss":
        lines.append(
            f"Inter-reader agreement on real/synthetic: Fleiss' kappa = {_fmt(a['kappa'])} "
            f"({a['n_readers']} readers)."
        )
        lines.append("")
        lines.append(
            "Pairwise Cohen's kappa: "
            + "; ".join(f"{p['a']}–{p['b']} {_fmt(p['kappa'])}" for p in a["pairwise_cohen"])
            + "."
        )
    else:
        lines.append("One reader: no inter-reader agreement.")
    lines += [
        "",
        "Reading: a large binomial p means no evidence that the reader told synthetic from real better "
        "than chance (with few images that is weak evidence, see the confidence interval); a small p "
        "with accuracy below 0.5 means the reader systematically took one class for the other. A kappa "
        "is undefined when the readers gave every image the same answer.",
        "",
    ]
    return "\n".join(lines)


def _figure(s: dict[str, Any], path: Path) -> Path:
    """Per reader: accuracy / sensitivity / specificity against chance, and mean ratings of real
    vs synthetic images (the two things a reader study is read for)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    readers = [r["reader"] for r in s["readers"]]
    x = np.arange(len(readers))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8.0, 2.0 + 1.6 * len(readers)), 3.6))
    width = 0.27
    for k, (name, color) in enumerate((("accuracy", "C0"), ("sensitivity", "C1"), ("specificity", "C2"))):
        vals = [np.nan if r[name] is None else r[name] for r in s["readers"]]
        ax1.bar(x + (k - 1) * width, vals, width, label=name, color=color)
    ax1.axhline(CHANCE, color="0.3", ls="--", lw=1, label="chance")
    ax1.set(ylim=(0, 1.05), xticks=x, xticklabels=readers, title="telling synthetic from real")
    ax1.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=4, frameon=False)
    width = 0.2
    bars = (
        ("realism", REAL, "C0", None),
        ("realism", SYNTHETIC, "C0", "//"),
        ("plausibility", REAL, "C3", None),
        ("plausibility", SYNTHETIC, "C3", "//"),
    )
    for k, (rating, truth, color, hatch) in enumerate(bars):
        vals = [np.nan if r[rating][truth] is None else r[rating][truth] for r in s["readers"]]
        ax2.bar(
            x + (k - 1.5) * width,
            vals,
            width,
            color=color,
            hatch=hatch,
            alpha=0.8,
            label=f"{rating}, {truth}",
        )
    ax2.set(ylim=(0, 5.2), xticks=x, xticklabels=readers, title="mean rating (1–5)")
    ax2.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
    title = (
        f"Reader study {s['study_id']}: {s['dataset']} / {s['model']} "
        f"({s['n_real']} real, {s['n_fake']} synthetic)"
    )
    demo = s.get("scale") == "demo"
    fig.suptitle(title + (f"\n{DEMO_LABEL.upper()}" if demo else ""), color="darkred" if demo else "black")
    fig.tight_layout()
    with vio.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
