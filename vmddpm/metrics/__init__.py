"""Evaluation maths and the pieces it needs, each knowing nothing of configs or stages.

- `extractor`: the feature network: torch-fidelity's Inception-v3 (weights located and sha256-checked,
  never downloaded) or a fixed-seed random twin for the demo, registered with torch-fidelity;
- `features`: 2048-d pool features of uint8 images (torch-fidelity's resize) and clean-fid's features;
- `images`: folders of uint8 grayscale PNGs, validated, with a content digest;
- `fid`: FID, KID and the real-vs-real floor from features;
- `memorisation`: nearest-training-image distances of generated images.

Why it is built this way:

* **One feature pass per image set.** Features come from torch-fidelity's own Inception-v3 module
  (`FeatureExtractorInceptionV3`, 2048-d pool features, its TF1-exact bilinear resize to 299): the very
  network and preprocessing `torch_fidelity.calculate_metrics` uses (a test checks that both give the
  same FID on the same folders). Computing the features here, not inside `calculate_metrics`, lets the
  reference set's features be computed once per dataset and cached (`vmddpm.evalkit`), and lets the
  floor, KID and FID reuse one pass.
* **FID/KID from torch-fidelity's functions** (`fid_features_to_statistics`, `fid_statistics_to_metric`,
  `kid_features_to_metric`). When a set has fewer images than feature dimensions (every demo run) the
  Fréchet trace term is computed exactly in the n-dimensional sample space instead of by a 2048 x 2048
  eigen-decomposition (same number, ~100x faster; tests compare it against both libraries).
* **clean-fid cross-check**: the same Inception weights fed through clean-fid's own file reading and
  anti-aliased PIL-bicubic resize (`cleanfid.fid.get_files_features`, mode "clean"). A large gap between
  `fid` and `fid_clean` means the number depends on resizing, which a reader should know.
* **Inception weights are never downloaded here**: they come from torch-fidelity's cache or
  `eval.inception_weights`, are checked against the published sha256, and their absence is a one-line
  error saying where to get the file. `eval.extractor: random-inception` (a fixed-seed random network)
  exists for the demo and tests; its numbers are labelled and never compared with the paper.
"""
