"""The evaluate stage on real PNG folders: FID/KID sanity, library agreement, memorisation, bad input.

The random-inception extractor (fixed seed) stands in for the real weights, which cannot be
downloaded here; the test with the real weights runs where they are present and skips otherwise.
Images are 24 px and few, so each feature pass costs seconds on CPU.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vmddpm import contracts as C
from vmddpm import evalkit as K
from vmddpm.config import load_config
from vmddpm.errors import UserError
from vmddpm.metrics import extractor as X
from vmddpm.metrics import features as F
from vmddpm.metrics import fid as FID
from vmddpm.metrics import images as I
from vmddpm.metrics import memorisation as MEM
from vmddpm.stages import evaluate as E

ROOT = Path(__file__).resolve().parents[1]
SIZE = 24
N = 16
# fid (torch-fidelity's TF1-bilinear resize) and fid_clean (clean-fid's PIL-bicubic resize) see the
# same network but differently resized pixels: on noise-free 24 px sets upsampled 12x they agree to
# this relative tolerance (measured 2% and 6%; the bound leaves room for other platforms).
RESIZE_REL_TOL = 0.15


def phantoms(n: int, seed: int, size: int = SIZE) -> np.ndarray:
    """Smooth blob images (uint8 N x H x W): a stand-in for slices, different per seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.zeros((n, size, size))
    for i in range(n):
        for _ in range(3):
            cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.08, 0.25)
            out[i] += rng.uniform(0.3, 1.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    return (255 * out / out.max(axis=(1, 2), keepdims=True)).astype(np.uint8)


def write_pngs(folder: Path, images: np.ndarray, prefix: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im, mode="L").save(folder / f"{prefix}{i:05d}.png")
    return folder


def noisy(images: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(images + rng.normal(0, sigma, images.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory):
    """Demo config (random-inception) whose runs/ (the feature cache) lives in a private folder."""
    tmp = tmp_path_factory.mktemp("cfg")
    (tmp / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    return load_config(
        tmp / "params.yaml",
        scale="demo",
        overrides=[
            "eval.kid_subset_size=8",
            "eval.kid_subsets=5",
            "eval.device=cpu",
            "eval.clean_fid=true",  # off at demo scale (cost); these tests check the cross-check
            "tracking.enabled=false",
        ],
    )


@pytest.fixture(scope="module")
def extractor(cfg):
    return K.load_extractor(cfg)


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, I.ImageSet]:
    """real (reference), other (an independent draw of the same distribution), noisy copies of real."""
    tmp = tmp_path_factory.mktemp("sets")
    real = phantoms(N, seed=1)
    other = phantoms(N, seed=2)
    arrays = {"real": real, "other": other}
    for s in (8, 24, 64):
        arrays[f"noise{s}"] = noisy(real, s)
    arrays["contrast"] = (0.7 * real.astype(float) + 40).astype(np.uint8)
    return {k: I.load_folder(write_pngs(tmp / k, v), k) for k, v in arrays.items()}


def test_fid_of_a_set_against_itself_is_zero(cfg, extractor, sets):
    out = E.compute_metrics(cfg, sets["real"], sets["real"], sets["real"], extractor, cache_tag="real")
    scale = FID.frechet_distance(
        F.extract_features(sets["real"].pixels, extractor, 32),
        F.extract_features(sets["noise64"].pixels, extractor, 32),
    )
    assert scale > 0
    assert abs(out["fid"]) < 1e-6 * scale
    assert abs(out["fid_clean"]) < 1e-6 * scale
    assert abs(out["kid_mean"]) < 1e-3
    # every generated image is an exact copy of a training image
    assert out["memorised_share"] == 1.0 and out["nn_distance_min"] == 0.0


def test_fid_rises_monotonically_with_noise(cfg, extractor, sets):
    """Gaussian noise (sigma 8, 24, 64 grey levels) added to a copy of the reference set."""
    ref = F.extract_features(sets["real"].pixels, extractor, 32)
    fids = [
        FID.frechet_distance(ref, F.extract_features(sets[k].pixels, extractor, 32))
        for k in ("noise8", "noise24", "noise64")
    ]
    assert all(math.isfinite(f) and f > 0 for f in fids)
    assert fids[0] < fids[1] < fids[2], fids


def test_frechet_distance_matches_both_libraries():
    """Our fast exact trace (n < d) against torch-fidelity's eigvals and clean-fid's sqrtm."""
    import torch
    from cleanfid.fid import fid_from_feats
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    rng = np.random.default_rng(0)
    f1, f2 = rng.normal(size=(40, 256)), rng.normal(0.1, 1.2, size=(30, 256))  # n < d: the fast path
    ours = FID.frechet_distance(f1, f2)
    tf = fid_statistics_to_metric(
        fid_features_to_statistics(torch.from_numpy(f1)),
        fid_features_to_statistics(torch.from_numpy(f2)),
        False,
    )["frechet_inception_distance"]
    assert ours == pytest.approx(tf, rel=1e-6)
    assert ours == pytest.approx(fid_from_feats(f1, f2), rel=1e-6)
    # n >= d goes through torch-fidelity itself
    g1, g2 = rng.normal(size=(12, 8)), rng.normal(0.5, 1.0, size=(15, 8))
    assert FID.frechet_distance(g1, g2) == pytest.approx(fid_from_feats(g1, g2), rel=1e-6)


@pytest.mark.slow  # ~30 s idle, more on a loaded machine: three libraries each read both folders
def test_torch_fidelity_and_clean_fid_agree_on_the_same_folders(cfg, extractor, sets):
    """One network (the fixed-seed random Inception), the same folders, each library's own reading:

    * our `fid` == `torch_fidelity.calculate_metrics` on the two folders (rel 1e-3);
    * our `fid_clean` == FID of the features clean-fid's `get_folder_features(mode="clean")` extracts
      from the two folders (rel 1e-6); that the Fréchet step matches clean-fid's own is
      test_frechet_distance_matches_both_libraries (its 2048-d sqrtm costs ~15 s per call on CPU);
    * `fid` vs `fid_clean` differ only by the resize (TF1 bilinear vs anti-aliased PIL bicubic): within
      RESIZE_REL_TOL on sets that differ in content or contrast (measured 2-6%). Pixel noise is where
      the resizes part ways (measured 2x at sigma=24): what the cross-check is there to reveal.
    """
    import torch_fidelity
    from cleanfid.fid import get_folder_features

    real, fake = sets["real"], sets["noise24"]
    out = E.compute_metrics(cfg, real, fake, None, extractor, cache_tag="real")
    lib = torch_fidelity.calculate_metrics(
        input1=str(fake.folder),
        input2=str(real.folder),
        fid=True,
        feature_extractor=X.RANDOM_EXTRACTOR_NAME,
        cuda=False,
        cache=False,
        save_cpu_ram=True,  # no DataLoader worker processes
        verbose=False,
    )
    assert out["fid"] == pytest.approx(lib["frechet_inception_distance"], rel=1e-3)
    kw = {"num_workers": 0, "batch_size": 32, "device": extractor.device, "mode": "clean", "verbose": False}
    model = F._CleanFidModel(extractor)
    clean = FID.frechet_distance(
        get_folder_features(str(real.folder), model, **kw), get_folder_features(str(fake.folder), model, **kw)
    )
    assert out["fid_clean"] == pytest.approx(clean, rel=1e-6)
    for other in ("other", "contrast"):
        res = E.compute_metrics(cfg, real, sets[other], None, extractor, cache_tag="real")
        assert res["fid"] > 0
        assert res["fid_clean"] == pytest.approx(res["fid"], rel=RESIZE_REL_TOL), other


@pytest.mark.skipif(
    not any((X.torch_hub_checkpoints() / n).is_file() for n in X.INCEPTION_ALIASES),
    reason=f"real Inception weights absent (no network here): put {X.INCEPTION_FILENAME} "
    "in torch hub's checkpoints folder",
)
def test_real_weights_torch_fidelity_and_clean_fid_agree(cfg, sets, tmp_path):
    import dataclasses

    real_cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, extractor="inception"))
    ex = K.load_extractor(real_cfg)
    assert ex.weights_sha256 == X.INCEPTION_SHA256
    for other in ("other", "contrast"):
        out = E.compute_metrics(real_cfg, sets["real"], sets[other], None, ex, cache_tag="realweights")
        assert out["fid"] > 0 and out["weights_sha256"] == X.INCEPTION_SHA256
        assert out["fid_clean"] == pytest.approx(out["fid"], rel=RESIZE_REL_TOL), other


def test_missing_or_wrong_weights_say_how_to_provide_them(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    cfg = make_cfg("eval.extractor=inception")
    with pytest.raises(UserError) as e:
        K.load_extractor(cfg)
    msg = str(e.value)
    assert "\n" not in msg and X.INCEPTION_URL in msg and "eval.inception_weights" in msg
    assert str(tmp_path / "torch-home") in msg
    bogus = tmp_path / "weights.pth"
    bogus.write_bytes(b"not the weights")
    with pytest.raises(UserError, match=r"weights\.pth: sha256 .* is not the pt_inception-2015-12-05"):
        K.load_extractor(make_cfg("eval.extractor=inception", f"eval.inception_weights={bogus}"))
    with pytest.raises(UserError, match=r"eval\.inception_weights names no file"):
        K.load_extractor(
            make_cfg("eval.extractor=inception", f"eval.inception_weights={tmp_path / 'nope.pth'}")
        )


def test_reference_features_are_cached_and_keyed_on_content(cfg, extractor, tmp_path):
    small = I.load_folder(write_pngs(tmp_path / "small", phantoms(6, seed=7)), "small")
    first = K.reference_features(cfg, small, extractor, tag="cachetest")
    files = sorted(K.cache_dir(cfg).glob("cachetest-*.npz"))
    assert len(files) == 1
    again = K.reference_features(cfg, small, extractor, tag="cachetest")
    assert again["key"] == first["key"]
    np.testing.assert_array_equal(again["feats"], first["feats"])
    assert again["floor"] == pytest.approx(first["floor"])
    # one changed pixel in one image: a different key, a second cache file
    pix = small.pixels.copy()
    pix[0, 0, 0] ^= 1
    changed = I.load_folder(write_pngs(tmp_path / "changed", pix), "changed")
    assert K.reference_features(cfg, changed, extractor, tag="cachetest")["key"] != first["key"]
    assert len(sorted(K.cache_dir(cfg).glob("cachetest-*.npz"))) == 2


def test_memorisation_flags_copies_and_passes_fresh_samples():
    train = phantoms(30, seed=5)
    fresh = phantoms(10, seed=6)
    copies = np.concatenate([train[:3], train[3:5, :, ::-1], fresh[:5]])  # 3 copies + 2 mirrored copies
    flagged = MEM.memorisation(copies, train, threshold=0.02, hflip=True)
    assert flagged["memorised_count"] == 5 and flagged["memorised_share"] == pytest.approx(0.5)
    assert flagged["nn_distance_min"] == 0.0
    without_flip = MEM.memorisation(copies, train, threshold=0.02, hflip=False)
    assert without_flip["memorised_count"] == 3
    passed = MEM.memorisation(fresh, train, threshold=0.02, hflip=True)
    assert passed["memorised_count"] == 0 and passed["nn_distance_min"] > 0.02
    # a near-copy (a few grey levels of noise) still counts
    near = MEM.memorisation(noisy(train[:4], 2.0), train, threshold=0.02, hflip=True)
    assert near["memorised_count"] == 4


# ------------------------------------------------------------------------------------- bad input
def test_folder_with_zero_images(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty: contains no PNG images"):
        I.load_folder(tmp_path / "empty", "generated")
    with pytest.raises(UserError, match=r"missing: no such folder"):
        I.load_folder(tmp_path / "missing", "generated")


def test_folder_with_mixed_sizes(tmp_path):
    folder = write_pngs(tmp_path / "mixed", phantoms(3, 0, size=24))
    Image.fromarray(phantoms(1, 1, size=32)[0], mode="L").save(folder / "zz.png")
    with pytest.raises(UserError, match=r"mixed: mixed image sizes \(zz.png is 32x32, 00000.png is 24x24\)"):
        I.load_folder(folder, "generated")


def test_folder_with_non_image_files(tmp_path):
    folder = write_pngs(tmp_path / "junk", phantoms(3, 0))
    (folder / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match=r"junk: 1 entries are not PNG images \(notes.txt\)"):
        I.load_folder(folder, "generated")
    (folder / "notes.txt").unlink()
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(UserError, match=r"junk: broken.png is not a readable image"):
        I.load_folder(folder, "generated")
    (folder / "broken.png").unlink()
    Image.fromarray(np.zeros((24, 24, 3), np.uint8), mode="RGB").save(folder / "rgb.png")
    with pytest.raises(UserError, match=r"junk: rgb.png has mode RGB"):
        I.load_folder(folder, "generated")
    (folder / ".tmp-partial.png").write_bytes(b"")  # hidden files (atomic temp files) are ignored
    (folder / "rgb.png").unlink()
    assert len(I.load_folder(folder, "generated")) == 3


def test_fewer_images_than_kid_subset_or_n_fake(cfg, extractor, sets, tmp_path):
    few = I.load_folder(write_pngs(tmp_path / "few", phantoms(5, 3)), "generated")
    with pytest.raises(
        UserError, match=r"few: 5 images, fewer than eval.kid_subset_size=8 .*lower eval.kid_subset_size"
    ):
        E.compute_metrics(cfg, sets["real"], few, None, extractor, cache_tag="few")
    with pytest.raises(UserError, match=r"few: holds 5 images but eval.n_fake asks for 10"):
        I.load_folder(tmp_path / "few", "generated", limit=10)


def test_generated_and_reference_sizes_must_match(cfg, extractor, sets, tmp_path):
    big = I.load_folder(write_pngs(tmp_path / "big", phantoms(10, 3, size=32)), "generated")
    with pytest.raises(UserError, match=r"big: images are 32x32 but the reference .* has 24x24"):
        E.compute_metrics(cfg, sets["real"], big, None, extractor, cache_tag="big")


# ------------------------------------------------------------------------------ the stage itself
def make_prepared(folder: Path, splits: dict[str, np.ndarray]) -> Path:
    """A prepared dataset folder in the data stage's layout: PNGs + manifest.csv."""
    rows = ["file,subject,split,source,slice"]
    for split, images in splits.items():
        write_pngs(folder / split, images, prefix=f"{split}_")
        rows += [f"{split}/{split}_{i:05d}.png,s{split}{i},{split},test,{i}" for i in range(len(images))]
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder


def test_evaluate_writes_every_protocol_field(make_cfg, tmp_path, cli):
    cfg = make_cfg("eval.kid_subset_size=8", "eval.kid_subsets=4", "eval.n_fake=12", "eval.clean_fid=true")
    train = phantoms(20, seed=10)
    make_prepared(cfg.prepared_dir("acdc"), {"train": train, "val": phantoms(4, 11), "test": phantoms(4, 12)})
    fake = np.concatenate([train[:2], phantoms(12, seed=13)])  # 2 memorised, 12 fresh, 14 in total
    samples = write_pngs(cfg.samples_dir("acdc", "vmddpm"), fake)
    meta = {"sampler": "ddim", "steps": 7, "seed": 3, "eta": 0.0, "checkpoint_step": 40}
    (samples.parent / "samples_meta.json").write_text(json.dumps(meta))
    out = E.evaluate(cfg, "acdc", "vmddpm")
    assert out == cfg.metrics_path("acdc", "vmddpm")
    # metrics.json: numbers only (what DVC and pandas read); protocol.json beside it: how they were made
    numbers = json.loads(out.read_text())
    assert set(numbers) == set(C.METRICS_FIELDS)
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers.values())
    protocol = json.loads(cfg.protocol_path("acdc", "vmddpm").read_text())
    assert not set(protocol) & set(numbers) and set(C.PROTOCOL_FIELDS) <= set(protocol)
    assert protocol["samples_dir"] == "runs/acdc/vmddpm/samples"  # relative to the project
    assert protocol["samples_meta"] == "runs/acdc/vmddpm/samples_meta.json"
    m = C.read_record(out)
    assert m["n_real"] == 20 and m["n_fake"] == 12  # eval.n_fake picks the first 12 (sorted)
    assert m["memorised_count"] == 2
    assert m["extractor"] == "random-inception" and m["comparable_to_paper"] is False
    assert m["label"] == C.DEMO_LABEL
    assert (m["sampler"], m["steps"], m["seed"], m["checkpoint_step"]) == (
        "ddim",
        7,
        3,
        40,
    )  # from the meta file
    assert m["fid"] > 0 and m["fid_real_floor"] > 0 and m["fid_clean"] > 0
    # one MLflow run (real sqlite store), metrics at the checkpoint's training step
    from mlflow.tracking import MlflowClient

    from vmddpm.tracking import resolve_uri

    client = MlflowClient(tracking_uri=resolve_uri(cfg))
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.stage = 'evaluate'")
    assert run.data.tags["dataset"] == "acdc" and run.data.tags["model"] == "vmddpm"
    assert run.data.metrics["fid"] == pytest.approx(m["fid"])
    assert [h.step for h in client.get_metric_history(run.info.run_id, "fid")] == [40]
    # the CLI: a bad samples folder is a one-line error naming it, exit 2
    bad = tmp_path / "bad"
    write_pngs(bad, phantoms(3, 0))
    (bad / "x.txt").write_text("")
    proc = cli(
        "evaluate", "--dataset", "acdc", "--model", "vmddpm", "--samples", str(bad), cwd=tmp_path, check=False
    )
    assert proc.returncode == 2, proc.stderr
    assert str(bad) in proc.stderr and "x.txt" in proc.stderr


@pytest.mark.slow  # trains a tiny model, then samples and evaluates it at two DDIM step counts
def test_ddim_sweep_samples_and_evaluates_each_step_count(make_cfg):
    from tests.conftest import TINY
    from vmddpm.stages.train import train

    cfg = make_cfg(
        *TINY,
        "train.steps=2",
        "train.checkpoint_every=2",
        "sample.n_images=8",
        "eval.n_fake=8",
        "eval.kid_subset_size=4",
        "eval.kid_subsets=2",
        "eval.clean_fid=false",
        "eval.ddim_steps_sweep=[2, 4]",
    )
    make_prepared(cfg.prepared_dir("acdc"), {"train": phantoms(12, 1, 16), "val": phantoms(4, 2, 16)})
    train(cfg, "acdc", "vmddpm")
    from vmddpm.stages.sample import sample
    from vmddpm.stages.sweep import sweep as run_sweep

    sample(cfg, "acdc", "vmddpm")
    out = E.evaluate(cfg, "acdc", "vmddpm")
    m = json.loads(out.read_text())
    assert "fid_clean" not in m and m["n_fake"] == 8  # metrics.json: numbers only, clean-fid off
    assert run_sweep(cfg, "acdc", "vmddpm") == cfg.sweep_path("acdc", "vmddpm")
    sweep = json.loads(cfg.sweep_path("acdc", "vmddpm").read_text())
    assert [r["steps"] for r in sweep["rows"]] == [2, 4]
    assert all(r["fid"] > 0 and r["n_fake"] == 8 for r in sweep["rows"])
    assert sweep["label"] == C.DEMO_LABEL
    for k in (2, 4):
        assert len(list((cfg.run_dir("acdc", "vmddpm") / "ddim_sweep" / f"steps_{k}").glob("*.png"))) == 8
