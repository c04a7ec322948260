"""Reading a reader study back: study.json, the sealed key (checked against its recorded sha256) and
each reader's answer file (every problem collected and named at once)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vmddpm.errors import UserError
from vmddpm.readerstudy.format import (
    ANSWER_COLUMNS,
    KEY_CSV,
    MAX_LISTED,
    RATING_RANGE,
    RATINGS,
    STUDY_JSON,
    TRUTHS,
    ReaderAnswers,
)


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
