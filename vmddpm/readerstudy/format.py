"""The files of a reader study and of an answer file: names, columns, classes, ratings."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

FORMAT_VERSION = 1
REAL, SYNTHETIC = "real", "synthetic"
TRUTHS = (REAL, SYNTHETIC)
KEY_COLUMNS = ("image_id", "truth", "source")
ANSWER_COLUMNS = ("study", "reader", "image_id", "answer", "realism", "plausibility", "timestamp")
RATINGS = ("realism", "plausibility")
RATING_RANGE = range(1, 6)
CHANCE = 0.5  # a reader who guesses (or answers by coin flip) is right half the time
STUDY_JSON, KEY_CSV, READER_DIR, IMAGES_DIR = "study.json", "key.csv", "reader", "images"
PAGE = "page.html"  # beside this module: the page readers open
MAX_LISTED = 10  # problems named in one error line; the rest are counted


@dataclass
class ReaderAnswers:
    """One reader's validated answer file: image id -> (answer, realism, plausibility)."""

    reader: str
    path: Path
    sha256: str
    answers: dict[str, str] = field(default_factory=dict)
    ratings: dict[str, dict[str, int]] = field(default_factory=dict)  # rating name -> id -> 1..5
