"""Blinded real-vs-synthetic reader study: the parts the reader-study stage (`vmddpm.stages.readerstudy`)
composes.

The paper's qualitative claim (radiologists find the synthetic images hard to tell from real ones)
rests on a reader study. This package makes that study repeatable by any group with its own readers:
`format` (the study folder's files and the answer file's columns), `make` (draw, re-encode, seal, the
reader page `page.html`), `score` (read and validate the key and the answer files), `stats` (accuracy,
binomial test, Cohen's and Fleiss' kappa), `summary` (the Markdown summary) and `figure` (scores.png).

`vmddpm reader-study make` writes a study folder::

    <out>/study.json          what was drawn: dataset, model, seed, counts, image ids in display order,
                              sha256 of key.csv, the vmddpm version that made it
    <out>/key.csv             the sealed key: image id -> real/synthetic and the source file
    <out>/reader/index.html   the page readers open (from file://, no server, no network)
    <out>/reader/images/      img_0001.png ... in display order; which is real is random under the seed

Why it is built this way:

* Only `reader/` goes to the readers, and nothing in it says which image is real: opaque ids in a
  random order, the images re-encoded without metadata (a PNG text chunk or a file name could leak
  the source), and the page embeds image ids only. The key stays with the organiser.
* The key's sha256 is recorded in `study.json`, so `vmddpm reader-study score` refuses a key that was
  edited after the study was made (a silent change would change every score).
* The page keeps answers in the browser's localStorage under the study id and reader id, so a reload
  or a closed tab loses nothing; answer files carry the study id, so an answer file from another
  study (whose image ids look the same) is refused instead of scored against the wrong key.
* The study folder is built in a temporary folder and renamed into place: a crash leaves no
  half-made study, and an existing study (its key and the answers collected for it) is never
  overwritten.
* Agreement statistics (Cohen's and Fleiss' kappa) are computed with exact rational arithmetic: they
  are a few lines, and exactness makes them checkable against hand-worked examples.
"""
