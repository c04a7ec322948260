"""vmddpm reader-study (vmddpm.stages.readerstudy over vmddpm.readerstudy): make a blinded study, score
synthetic readers and a real browser session, refuse bad inputs.

The prepared dataset and the samples folder are tiny 8-px PNGs written here (the study code only
copies and counts them); the study and scorer run through the real CLI entry point.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import time
from collections import Counter
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vmddpm import contracts as C
from vmddpm.cli import main
from vmddpm.config import Config
from vmddpm.errors import UserError
from vmddpm.readerstudy import format as fmt
from vmddpm.readerstudy import stats
from vmddpm.stages import readerstudy as rs

DATASET, MODEL = "acdc", "vmddpm"
SIZE = 8
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


# ------------------------------------------------------------------------------------------ helpers
def write_pngs(folder: Path, names: list[str], seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8), mode="L").save(folder / name)


def write_prepared(folder: Path, n_test: int, n_train: int = 4) -> Path:
    """A prepared dataset in the data stage's format (PNG slices + manifest.csv)."""
    rows = []
    for i in range(n_train + n_test):
        split = "test" if i >= n_train else "train"
        rows.append({"file": f"slices/s{i:03d}_000.png", "subject": f"s{i:03d}", "split": split})
    write_pngs(folder, [r["file"] for r in rows], seed=0)
    with (folder / "manifest.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["file", "subject", "split", "source", "slice"])
        w.writeheader()
        w.writerows({**r, "source": "phantom", "slice": 0} for r in rows)
    return folder


@pytest.fixture
def project(make_cfg) -> Config:
    """A config in tmp_path with 120 real test slices and 150 generated samples in place."""
    cfg = make_cfg("tracking.enabled=false")
    write_prepared(cfg.prepared_dir(DATASET), n_test=120)
    write_pngs(cfg.samples_dir(DATASET, MODEL), [f"{i:06d}.png" for i in range(150)], seed=1)
    return cfg


def cli_make(cfg: Config, out: Path, n_real: int, n_fake: int, seed: int = 0) -> Path:
    argv = ["--params", str(cfg.source), "-q", "reader-study", "make", "--dataset", DATASET, "--model", MODEL]
    argv += ["--n-real", str(n_real), "--n-fake", str(n_fake), "--seed", str(seed), "--out", str(out)]
    assert main(argv) == 0
    return out


def cli_score(cfg: Config, study: Path, answers: list[Path]) -> dict:
    argv = ["--params", str(cfg.source), "-q", "reader-study", "score", "--study", str(study), "--answers"]
    assert main([*argv, *map(str, answers)]) == 0
    return json.loads((study / "scores.json").read_text())


def read_key(study: Path) -> dict[str, str]:
    with (study / "key.csv").open(newline="") as fh:
        return {r["image_id"]: r["truth"] for r in csv.DictReader(fh)}


def write_answers(
    path: Path,
    study: Path,
    reader: str,
    answers: dict[str, str],
    ratings: Callable[[str], tuple[int, int]] = lambda image_id: (3, 3),
    rows: list[dict] | None = None,
) -> Path:
    """An answer file as the page writes it; `rows` (if given) is written as is."""
    study_id = json.loads((study / "study.json").read_text())["study_id"]
    if rows is None:
        rows = [
            {
                "study": study_id,
                "reader": reader,
                "image_id": i,
                "answer": a,
                "realism": ratings(i)[0],
                "plausibility": ratings(i)[1],
                "timestamp": "2024-05-01T10:00:00.000Z",
            }
            for i, a in answers.items()
        ]
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(fmt.ANSWER_COLUMNS))
        w.writeheader()
        w.writerows(rows)
    return path


def np_cohen(a: list[str], b: list[str]) -> float:
    """Cohen's kappa from the 2x2 confusion matrix (an implementation independent of the module's)."""
    cats = ["real", "synthetic"]
    m = np.zeros((2, 2))
    for x, y in zip(a, b, strict=True):
        m[cats.index(x), cats.index(y)] += 1
    m /= m.sum()
    p_o = np.trace(m)
    p_e = float(m.sum(axis=1) @ m.sum(axis=0))
    return (p_o - p_e) / (1 - p_e)


def np_fleiss(labels: list[list[str]]) -> float:
    """Fleiss' kappa from the items x categories count matrix (independent of the module's)."""
    cats = ["real", "synthetic"]
    counts = np.array([[sum(r[i] == c for r in labels) for c in cats] for i in range(len(labels[0]))], float)
    n = counts.sum(axis=1)[0]
    p_i = ((counts**2).sum(axis=1) - n) / (n * (n - 1))
    p_j = counts.sum(axis=0) / counts.sum()
    return (p_i.mean() - (p_j**2).sum()) / (1 - (p_j**2).sum())


# ------------------------------------------------------------------------------------- acceptance 1
def test_make_then_score_perfect_chance_and_always_real_readers(project: Config, tmp_path: Path) -> None:
    n_real, n_fake = 80, 120
    study = cli_make(project, tmp_path / "study", n_real, n_fake, seed=7)
    meta = json.loads((study / "study.json").read_text())
    key = read_key(study)
    ids = meta["images"]
    assert (meta["dataset"], meta["model"], meta["seed"]) == (DATASET, MODEL, 7)
    assert (meta["n_real"], meta["n_fake"], len(ids)) == (n_real, n_fake, n_real + n_fake)
    assert meta["created_by"].startswith("vmddpm ")
    assert sorted(key) == sorted(ids) and Counter(key.values()) == {"real": n_real, "synthetic": n_fake}

    rng = np.random.default_rng(123)
    chance = {i: str(rng.choice(["real", "synthetic"])) for i in ids}
    chance_ratings = {i: (int(rng.integers(1, 6)), int(rng.integers(1, 6))) for i in ids}
    files = {
        "perfect": write_answers(
            tmp_path / "perfect.csv", study, "perfect", key, lambda i: (5, 4) if key[i] == "real" else (2, 1)
        ),
        "perfect2": write_answers(tmp_path / "perfect2.csv", study, "perfect2", dict(key)),
        "chance": write_answers(tmp_path / "chance.csv", study, "chance", chance, chance_ratings.__getitem__),
        "real": write_answers(tmp_path / "real.csv", study, "always-real", dict.fromkeys(ids, "real")),
    }
    labels = {
        "perfect": [key[i] for i in ids],
        "chance": [chance[i] for i in ids],
        "real": ["real"] * len(ids),
    }

    s = cli_score(project, study, [files["perfect"], files["chance"], files["real"]])
    by = {r["reader"]: r for r in s["readers"]}
    p, c, r = by["perfect"], by["chance"], by["always-real"]
    assert (p["accuracy"], p["sensitivity"], p["specificity"]) == (1.0, 1.0, 1.0)
    assert p["binom_p"] < 1e-30
    assert (p["realism"], p["plausibility"]) == ({"real": 5, "synthetic": 2}, {"real": 4, "synthetic": 1})
    expected_chance = sum(chance[i] == key[i] for i in ids) / len(ids)
    assert c["accuracy"] == pytest.approx(expected_chance) and 0.4 < c["accuracy"] < 0.6
    assert c["binom_p"] > 0.01
    real_ids = [i for i in ids if key[i] == "real"]
    assert c["realism"]["real"] == pytest.approx(np.mean([chance_ratings[i][0] for i in real_ids]))
    assert r["accuracy"] == pytest.approx(n_real / (n_real + n_fake))
    assert (r["sensitivity"], r["specificity"]) == (0.0, 1.0)

    agreement = s["agreement"]
    assert agreement["method"] == "fleiss" and agreement["n_readers"] == 3
    fleiss = np_fleiss([labels["perfect"], labels["chance"], labels["real"]])
    assert agreement["kappa"] == pytest.approx(fleiss, abs=1e-12)
    pairs = {(q["a"], q["b"]): q["kappa"] for q in agreement["pairwise_cohen"]}
    assert pairs["perfect", "always-real"] == pytest.approx(0.0, abs=1e-12)
    assert pairs["perfect", "chance"] == pytest.approx(
        np_cohen(labels["perfect"], labels["chance"]), abs=1e-12
    )

    summary = (study / "summary.md").read_text()
    assert "Fleiss' kappa" in summary and "always-real" in summary and C.DEMO_LABEL in summary
    assert Image.open(study / "scores.png").size[0] > 300

    s2 = cli_score(project, study, [files["perfect"], files["perfect2"]])
    assert s2["agreement"]["method"] == "cohen" and s2["agreement"]["kappa"] == 1.0
    s3 = cli_score(project, study, [files["perfect"], files["chance"]])
    expected = np_cohen(labels["perfect"], labels["chance"])
    assert s3["agreement"]["kappa"] == pytest.approx(expected, abs=1e-12)
    s4 = cli_score(project, study, [files["real"]])
    assert s4["agreement"]["method"] is None and s4["readers"][0]["reader"] == "always-real"


def test_study_is_blinded_deterministic_and_self_contained(project: Config, tmp_path: Path) -> None:
    a = cli_make(project, tmp_path / "a", 5, 7, seed=3)
    b = cli_make(project, tmp_path / "b", 5, 7, seed=3)
    c = cli_make(project, tmp_path / "c", 5, 7, seed=4)
    assert (a / "key.csv").read_bytes() == (b / "key.csv").read_bytes()  # same seed, same draw and order
    assert (a / "key.csv").read_bytes() != (c / "key.csv").read_bytes()
    meta = json.loads((a / "study.json").read_text())
    assert meta["key_sha256"] == hashlib.sha256((a / "key.csv").read_bytes()).hexdigest()

    reader = a / "reader"
    files = sorted(p.relative_to(reader).as_posix() for p in reader.rglob("*") if p.is_file())
    assert meta["images"] == [f"img_{k:04d}" for k in range(1, 13)]  # display order; truth is random
    assert files == [f"images/{i}.png" for i in meta["images"]] + ["index.html"]  # no key for readers
    page = (reader / "index.html").read_text()
    embedded = json.loads(page.split('type="application/json">')[1].split("</script>")[0])
    assert [im["id"] for im in embedded["images"]] == meta["images"]
    assert set(embedded) == {"study_id", "title", "images", "version"}  # no truth, no source
    for forbidden in ("key.csv", "slices/", "s000_000", "samples", "000000.png", meta["key_sha256"][:12]):
        assert forbidden not in page
    assert "http://" not in page and "https://" not in page and "<link" not in page and " src=" not in page
    for im in (reader / "images").iterdir():
        with Image.open(im) as img:
            assert img.format == "PNG" and img.size == (SIZE, SIZE) and not img.info.get("text")
    # the copied pixels are the source's: the key's source path names the file that was drawn
    key_rows = list(csv.DictReader((a / "key.csv").open()))
    first = key_rows[0]
    assert np.array_equal(
        np.array(Image.open(reader / "images" / f"{first['image_id']}.png")),
        np.array(Image.open(project.root / first["source"])),
    )
    assert {r["source"].split("/")[0] for r in key_rows} == {"data", "runs"}


# ----------------------------------------------------------------------------------------- kappas
def test_cohen_kappa_hand_example() -> None:
    """Wikipedia's worked example: 50 items; yes/yes 20, yes/no 5, no/yes 10, no/no 15.
    p_o = 35/50 = 0.7; p_e = 0.5*0.6 + 0.5*0.4 = 0.5; kappa = (0.7 - 0.5) / 0.5 = 0.4 exactly."""
    a = ["yes"] * 25 + ["no"] * 25
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert stats.cohen_kappa(a, b) == Fraction(2, 5)
    assert stats.cohen_kappa(a, a) == 1
    assert stats.cohen_kappa(["x"] * 4, ["x"] * 4) is None  # chance agreement is 1: undefined


def test_fleiss_kappa_hand_examples() -> None:
    """3 raters, 4 items, counts (synthetic, real) = (3,0), (0,3), (2,1), (1,2):
    P_i = 1, 1, 1/3, 1/3 -> P = 2/3; p_synthetic = p_real = 1/2 -> P_e = 1/2; kappa = (1/6)/(1/2) = 1/3."""
    raters = [
        ["synthetic", "real", "synthetic", "synthetic"],
        ["synthetic", "real", "synthetic", "real"],
        ["synthetic", "real", "real", "real"],
    ]
    assert stats.fleiss_kappa(raters) == Fraction(1, 3)
    # Fleiss' own example as on Wikipedia: 10 items, 14 raters, 5 categories -> P = 0.378, P_e = 0.213, 0.210
    table = [
        [0, 0, 0, 0, 14],
        [0, 2, 6, 4, 2],
        [0, 0, 3, 5, 6],
        [0, 3, 9, 2, 0],
        [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0],
        [3, 2, 6, 3, 0],
        [2, 5, 3, 2, 2],
        [6, 5, 2, 1, 0],
        [0, 2, 2, 3, 7],
    ]
    items = [[c for c, n in enumerate(row) for _ in range(n)] for row in table]
    raters14 = [[str(item[r]) for item in items] for r in range(14)]
    assert float(stats.fleiss_kappa(raters14)) == pytest.approx(0.210, abs=5e-4)
    # two raters: Fleiss' kappa is Scott's pi, not Cohen's kappa; a perfect pair is 1 either way
    assert stats.fleiss_kappa([raters[0], raters[0]]) == 1


# -------------------------------------------------------------------------------------- bad input
@pytest.fixture
def small(project: Config, tmp_path: Path) -> tuple[Config, Path, dict[str, str]]:
    study = cli_make(project, tmp_path / "small", 4, 4, seed=1)
    return project, study, read_key(study)


def test_tampered_key_is_refused(small, tmp_path: Path, cli) -> None:
    cfg, study, key = small
    answers = write_answers(tmp_path / "ok.csv", study, "A", key)
    first = next(iter(key))
    text = (study / "key.csv").read_text()
    flipped = "synthetic" if key[first] == "real" else "real"
    (study / "key.csv").write_text(text.replace(f"{first},{key[first]}", f"{first},{flipped}"))
    with pytest.raises(UserError, match=r"key\.csv: sha256 .* recorded in .*study\.json"):
        rs.score_study(cfg, study, [answers])
    # through the real console entry: exit 2, one line on stderr
    proc = cli(
        "--params",
        str(cfg.source),
        "reader-study",
        "score",
        "--study",
        str(study),
        "--answers",
        str(answers),
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "key was changed" in err[0] and "Traceback" not in proc.stderr
    assert not (study / "scores.json").exists()


def test_foreign_answer_file_is_refused(small, project: Config, tmp_path: Path) -> None:
    cfg, study, _ = small
    other = cli_make(project, tmp_path / "other", 4, 4, seed=1)  # same ids, same size: another study
    foreign = write_answers(tmp_path / "foreign.csv", other, "A", read_key(other))
    with pytest.raises(UserError, match=r"foreign\.csv: answers are for study \w+, not \w+ .*another study"):
        rs.score_study(cfg, study, [foreign])
    bigger = cli_make(project, tmp_path / "bigger", 6, 6, seed=1)  # its ids run past this study's
    rows = list(csv.DictReader(write_answers(tmp_path / "b.csv", bigger, "A", read_key(bigger)).open()))
    study_id = json.loads((study / "study.json").read_text())["study_id"]
    mixed = write_answers(
        tmp_path / "mixed.csv", study, "A", {}, rows=[{**r, "study": study_id} for r in rows]
    )
    with pytest.raises(UserError, match=r"mixed\.csv: line 10: unknown image id 'img_0009'"):
        rs.score_study(cfg, study, [mixed])


def test_duplicate_missing_and_bad_rows_are_named(small, tmp_path: Path) -> None:
    cfg, study, key = small
    ids = list(key)
    good = write_answers(tmp_path / "good.csv", study, "A", key)
    rows = list(csv.DictReader(good.open()))

    dup = write_answers(tmp_path / "dup.csv", study, "A", {}, rows=[*rows[:3], rows[2], *rows[3:]])
    with pytest.raises(
        UserError, match=rf"dup\.csv: line 5: duplicate answer for {ids[2]} \(first on line 4\)"
    ):
        rs.score_study(cfg, study, [dup])

    missing = write_answers(tmp_path / "missing.csv", study, "A", {}, rows=rows[:5] + rows[6:])
    with pytest.raises(UserError, match=rf"missing\.csv: missing answers for 1 image\(s\): {ids[5]}$"):
        rs.score_study(cfg, study, [missing])

    bad = [dict(r) for r in rows]
    bad[1]["answer"], bad[3]["realism"], bad[4]["plausibility"] = "maybe", "7", ""
    badf = write_answers(tmp_path / "bad.csv", study, "A", {}, rows=bad)
    with pytest.raises(UserError) as e:
        rs.score_study(cfg, study, [badf])
    msg = str(e.value)
    assert (
        "line 3: answer 'maybe'" in msg and "line 5: realism '7'" in msg and "line 6: plausibility ''" in msg
    )
    assert "\n" not in msg

    cols = tmp_path / "cols.csv"
    cols.write_text("reader,image,answer\nA,img_0001,real\n")
    with pytest.raises(UserError, match=r"cols\.csv: columns \['reader', 'image', 'answer'\] are not"):
        rs.score_study(cfg, study, [cols])

    two = write_answers(tmp_path / "two.csv", study, "A", key)
    with pytest.raises(UserError, match=r"two\.csv: reader 'A' also answered in .*good\.csv"):
        rs.score_study(cfg, study, [good, two])


def test_make_refuses_existing_folder_and_too_few_images(project: Config, tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("answers collected last week")
    with pytest.raises(UserError, match=rf"{out}: already exists and is not empty"):
        rs.make_study(project, DATASET, MODEL, 2, 2, 0, out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert rs.make_study(project, DATASET, MODEL, 2, 2, None, empty) == empty  # an empty folder is fine
    assert json.loads((empty / "study.json").read_text())["seed"] == project.seed
    with pytest.raises(UserError, match=rf"{empty}: already exists"):  # a second make never overwrites
        rs.make_study(project, DATASET, MODEL, 2, 2, 0, empty)

    manifest = project.prepared_dir(DATASET) / "manifest.csv"
    with pytest.raises(UserError, match=rf"{manifest}: the test split has 120 images but --n-real is 121"):
        rs.make_study(project, DATASET, MODEL, 121, 2, 0, tmp_path / "x")
    samples = project.samples_dir(DATASET, MODEL)
    with pytest.raises(UserError, match=rf"{samples}: 150 generated PNGs but --n-fake is 151"):
        rs.make_study(project, DATASET, MODEL, 2, 151, 0, tmp_path / "x")
    with pytest.raises(UserError, match="at least 1"):
        rs.make_study(project, DATASET, MODEL, 0, 2, 0, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind


# ------------------------------------------------------------------------------------ acceptance 2
@pytest.mark.slow
def test_browser_session_survives_reload_and_downloads_scorable_csv(project: Config, tmp_path: Path) -> None:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(
            f"{CHROMIUM} or {CHROMEDRIVER} missing: `make browser` installs chromium + chromium-driver"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    study = cli_make(project, tmp_path / "study", 3, 3, seed=5)
    key = read_key(study)
    ids = json.loads((study / "study.json").read_text())["images"]
    flip = {"real": "synthetic", "synthetic": "real"}
    plan = {  # wrong on the first and fourth image, right on the others
        i: (key[i] if k % 3 else flip[key[i]], k % 5 + 1, 5 - k % 5) for k, i in enumerate(ids)
    }

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        opts.add_argument(arg)
    opts.add_experimental_option(
        "prefs",
        {
            "download.default_directory": str(downloads),
            "download.prompt_for_download": False,
            "safebrowsing.enabled": False,
        },
    )
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=str(CHROMEDRIVER)))
    try:
        driver.set_page_load_timeout(20)
        wait = WebDriverWait(driver, 10)

        def el(id_: str):
            return driver.find_element(By.ID, id_)

        def at(k: int) -> None:
            wait.until(lambda d: el("position").text == f"Image {k + 1} of {len(ids)}")

        def checked(name: str) -> str | None:
            got = [e.get_attribute("value") for e in driver.find_elements(By.NAME, name) if e.is_selected()]
            return got[0] if got else None

        driver.get((study / "reader" / "index.html").as_uri())
        wait.until(lambda d: el("start").is_displayed())
        el("reader").send_keys("dr-who")
        el("start-button").click()
        wait.until(lambda d: el("study").is_displayed())
        assert el("image").get_attribute("src").endswith(f"/reader/images/{ids[0]}.png")
        assert driver.execute_script("return document.getElementById('image').naturalWidth") == SIZE

        for k, image_id in enumerate(ids):
            at(k)
            answer, realism, plausibility = plan[image_id]
            el(f"answer-{answer}").click()
            el(f"realism-{realism}").click()
            el(f"plausibility-{plausibility}").click()
            assert el("progress").text == f"{k + 1} of {len(ids)} answered"
            if k == 2:  # mid-way: reload; the reader, position and every answer so far must survive
                driver.refresh()
                wait.until(lambda d: el("study").is_displayed())
                at(2)
                assert el("progress").text == f"3 of {len(ids)} answered"
                assert "dr-who" in el("reader-label").text
                for back in (1, 0):
                    el("prev").click()
                    at(back)
                    want = plan[ids[back]]
                    assert (checked("answer"), checked("realism"), checked("plausibility")) == (
                        want[0],
                        str(want[1]),
                        str(want[2]),
                    )
                el("next").click()
                el("next").click()
                at(2)
            if k + 1 < len(ids):
                el("next").click()

        el("download").click()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            done = [p for p in downloads.iterdir() if p.suffix == ".csv"]
            if done and not list(downloads.glob("*.crdownload")):
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"no CSV downloaded into {downloads}: {list(downloads.iterdir())}")
    finally:
        driver.quit()

    (csv_path,) = done
    rows = list(csv.DictReader(csv_path.open(newline="")))
    assert [r["image_id"] for r in rows] == ids and {r["reader"] for r in rows} == {"dr-who"}
    assert all(r["timestamp"].endswith("Z") for r in rows)
    shutil.copy(csv_path, tmp_path / "dr-who.csv")
    s = json.loads(rs.score_study(project, study, [tmp_path / "dr-who.csv"]).read_text())
    (r,) = s["readers"]
    right = {i for i in ids if plan[i][0] == key[i]}
    assert r["correct"] == len(right) == 4 and r["accuracy"] == pytest.approx(4 / 6)
    syn = [i for i in ids if key[i] == "synthetic"]
    real = [i for i in ids if key[i] == "real"]
    assert r["sensitivity"] == pytest.approx(sum(plan[i][0] == "synthetic" for i in syn) / len(syn))
    assert r["specificity"] == pytest.approx(sum(plan[i][0] == "real" for i in real) / len(real))
    assert r["realism"]["synthetic"] == pytest.approx(np.mean([plan[i][1] for i in syn]))
    assert r["plausibility"]["real"] == pytest.approx(np.mean([plan[i][2] for i in real]))
