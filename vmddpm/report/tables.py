"""The report's tables: rows, claims and the summary from metrics and the paper's numbers (no file I/O).

* A missing evaluation is a row that says "not run", never a crash: the report of a half-finished
  matrix is still useful.
* Demo-scale or random-extractor numbers are labelled "demo — not comparable to the paper" in every
  table row and header, and a demo row never holds a number of the paper (`fid_paper`, `paper_source`,
  `fid_minus_paper` stay empty): the paper's numbers are listed on their own, below the table. The rule
  is `vmddpm.contracts.is_comparable`.
* Every table is a pandas DataFrame, written as CSV (data), Markdown (GitHub) and HTML (Snakemake's
  report renders it; each table has its caption).
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

import pandas as pd

from vmddpm.config import Config
from vmddpm.contracts import DEMO_LABEL, is_comparable

NOT_RUN = "not run"
MAIN_COLUMNS = (
    "dataset",
    "model",
    "family",
    "rank",
    "fid",
    "fid_paper",
    "paper_source",
    "fid_minus_paper",
    "kid_mean",
    "kid_std",
    "fid_clean",
    "clean_fid",
    "fid_real_floor",
    "memorised_share",
    "nn_distance_median",
    "n_real",
    "n_fake",
    "extractor",
    "weights_sha256",
    "resize",
    "sampler",
    "steps",
    "seed",
    "scale",
    "comparable_to_paper",
    "label",
)
ABLATION_COLUMNS = (
    "dataset",
    "model",
    "change",
    "fid",
    "fid_minus_vmddpm",
    "kid_mean",
    "fid_real_floor",
    "fid_paper",
    "scale",
    "extractor",
    "label",
)


# ------------------------------------------------------------------------------------------ tables
def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def main_rows(cfg: Config, metrics: dict, reference: dict) -> list[dict[str, Any]]:
    """One row per dataset x model, ranked by FID within each dataset; not-run rows last."""
    rows: list[dict[str, Any]] = []
    for ds in cfg.datasets:
        block = []
        for model in cfg.models:
            ref = reference.get((ds, model), {})
            row: dict[str, Any] = {k: None for k in MAIN_COLUMNS}
            row.update(dataset=ds, model=model, family=cfg.preset(model).family)
            m = metrics.get((ds, model))
            if m is None:
                row["label"] = NOT_RUN
            else:
                for k in MAIN_COLUMNS:
                    if k in m and k not in (
                        "dataset",
                        "model",
                        "family",
                        "fid_paper",
                        "paper_source",
                        "label",
                    ):
                        row[k] = m[k]
                comparable = is_comparable(m)
                row["comparable_to_paper"] = comparable
                row["label"] = "" if comparable else DEMO_LABEL
                if row["clean_fid"] is None:  # written before protocol.json said whether it ran
                    row["clean_fid"] = row["fid_clean"] is not None
                if comparable and ref.get("value") is not None:  # the paper's number: beside comparable ones
                    row["fid_paper"] = ref["value"]
                    row["paper_source"] = ref.get("source")
                    row["fid_minus_paper"] = float(m["fid"]) - ref["value"]
            block.append(row)
        ranked = sorted((r for r in block if _num(r["fid"]) is not None), key=lambda r: r["fid"])
        for i, r in enumerate(ranked, start=1):
            r["rank"] = i
        rows += ranked + [r for r in block if r["rank"] is None]
    return rows


def _change(cfg: Config, model: str) -> str:
    over = cfg.preset(model).model or {}
    if not over:
        full = cfg.model_config(model)
        return f"full model (sr={full.sr}, mss_levels={full.mss_levels}, mixer={full.mixer})"
    return ", ".join(f"{k}={v}" for k, v in over.items())


def ablation_rows(cfg: Config, metrics: dict, reference: dict) -> list[dict[str, Any]]:
    """The vmunet-family presets of `models:`, each against the full `vmddpm` on every dataset."""
    presets = [m for m in cfg.models if cfg.preset(m).family == "vmunet"]
    rows = []
    for ds in cfg.datasets:
        base = _num((metrics.get((ds, "vmddpm")) or {}).get("fid"))
        for model in presets:
            m = metrics.get((ds, model))
            fid = _num((m or {}).get("fid"))
            rows.append(
                {
                    "dataset": ds,
                    "model": model,
                    "change": _change(cfg, model),
                    "fid": fid,
                    "fid_minus_vmddpm": None if fid is None or base is None else fid - base,
                    "kid_mean": (m or {}).get("kid_mean"),
                    "fid_real_floor": (m or {}).get("fid_real_floor"),
                    "fid_paper": (
                        reference.get((ds, model), {}).get("value")
                        if m is not None and is_comparable(m)
                        else None
                    ),
                    "scale": (m or {}).get("scale"),
                    "extractor": (m or {}).get("extractor"),
                    "label": NOT_RUN if m is None else ("" if is_comparable(m) else DEMO_LABEL),
                }
            )
    return rows


def _cell(x: Any, digits: int = 4) -> str:
    if x is None:
        return ""
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if not math.isfinite(x):
            return ""
        return f"{x:.{digits}g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"
    return str(x)


def frame(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> pd.DataFrame:
    """The rows as a DataFrame of exactly `columns`, values kept as they are (object dtype: no int -> float
    coercion of columns with gaps)."""
    return pd.DataFrame([{k: r.get(k) for k in columns} for r in rows], columns=list(columns), dtype=object)


def to_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    return frame(rows, columns).to_csv(index=False, na_rep="", lineterminator="\n")


def _markdown(df: pd.DataFrame) -> str:
    """A DataFrame of display strings as a GitHub Markdown table (`|` in a cell escaped)."""
    cells = df.map(lambda c: str(c).replace("|", "\\|"))
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "|".join("---" for _ in df.columns) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells.itertuples(index=False)]
    return "\n".join(lines)


def _html_table(df: pd.DataFrame, caption: str) -> str:
    """A DataFrame of display strings as an HTML table with its caption."""
    table = df.to_html(index=False, escape=True, border=0, classes="vmddpm", na_rep="")
    return table.replace(">", f">\n  <caption>{html.escape(caption)}</caption>", 1)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table.vmddpm { border-collapse: collapse; margin: 0.5em 0 2em; font-size: 13px; }
table.vmddpm caption { text-align: left; font-weight: 600; padding: 0.3em 0; }
table.vmddpm th, table.vmddpm td { border-bottom: 1px solid #ccc; padding: 3px 8px; text-align: right; }
table.vmddpm th { background: #f2f2f2; }
.demo { color: #8b0000; font-weight: 600; }
"""


def _html_page(title: str, parts: Sequence[str]) -> str:
    body = "\n".join(parts)
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}'
        f"</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n<h1>{html.escape(title)}</h1>\n{body}\n"
        "</body>\n</html>\n"
    )


def _banner(rows: Sequence[dict[str, Any]]) -> str:
    demo = [r for r in rows if r.get("label") == DEMO_LABEL]
    if not demo:
        return ""
    why = sorted({f"scale={r.get('scale')}, extractor={r.get('extractor')}" for r in demo})
    return (
        f"**{DEMO_LABEL.upper()}**: {len(demo)} of these rows were computed at {'; '.join(why)}. "
        "They check that the pipeline runs end to end; they say nothing about the paper's claims, so "
        "they hold no number of the paper and no difference to one."
    )


def _protocol(r: dict[str, Any]) -> str:
    if r.get("extractor") is None:
        return ""
    sha = str(r.get("weights_sha256") or "")[:8]
    steps = f" {r['steps']} steps" if r.get("steps") not in (None, "") else ""
    return f"{r['extractor']} ({sha}), {r.get('sampler')}{steps}, seed {r.get('seed')}, {r.get('scale')}"


CLEAN_FID_OFF = "off"
"""The clean-fid cell of a run evaluated with `eval.clean_fid: false` (the notes say why)."""
MAIN_INTRO = (
    "Ours: FID of `n_fake` generated images against the `n_real` reference images (torch-fidelity "
    "Inception-v3 pool features); clean-fid = the same with clean-fid's resize; floor = FID between "
    "two halves of the real set (what real data scores at this N); memorised = share of generated "
    "images within the memorisation threshold of a training image. Paper: arXiv:2405.05667 (claims "
    "and what is known of the method: docs/paper.md); its FID stands beside ours only in rows "
    "evaluated with the paper's protocol."
)
CLEAN_FID_NOTE = (
    "clean-fid {off}: `eval.clean_fid` was false for these runs (the demo scale switches the "
    "cross-check off: a second Inception pass per job; tests cover it). Turn it on with "
    "`dvc exp run -S scales.demo.eval.clean_fid=true` or `snakemake --config "
    "scales='{{demo: {{eval: {{clean_fid: true}}}}}}'`."
)
MAIN_HEADER = (
    "rank", "model", "FID (ours)", "FID (paper)", "ours − paper", "KID", "clean-fid FID",
    "real floor", "memorised", "n real / fake", "protocol", "label",
)  # fmt: skip


def main_display(rows: Sequence[dict[str, Any]], ds: str) -> pd.DataFrame:
    """The main table of one dataset, formatted for reading (Markdown and HTML)."""
    body = []
    for r in (r for r in rows if r["dataset"] == ds):
        kid = "" if r.get("kid_mean") is None else f"{_cell(r['kid_mean'])} ± {_cell(r.get('kid_std'), 2)}"
        n = "" if r.get("n_real") is None else f"{r['n_real']} / {r['n_fake']}"
        mem = "" if r.get("memorised_share") is None else f"{100 * r['memorised_share']:.1f}%"
        clean = CLEAN_FID_OFF if r.get("clean_fid") is False else _cell(r["fid_clean"])
        body.append(
            [
                _cell(r["rank"]),
                r["model"],
                _cell(r["fid"]),
                _cell(r["fid_paper"]),
                _cell(r["fid_minus_paper"]),
                kid,
                clean,
                _cell(r["fid_real_floor"]),
                mem,
                n,
                _protocol(r),
                r["label"] or "paper protocol",
            ]
        )
    return pd.DataFrame(body, columns=list(MAIN_HEADER), dtype=object)


def _paper_numbers(reference: dict) -> list[str]:
    return [
        f"{ds} {model}: FID {ref['value']:g} ({ref['source']})"
        for (ds, model), ref in sorted(reference.items())
        if ref.get("value") is not None
    ]


def _notes(rows: Sequence[dict[str, Any]], reference: dict) -> list[str]:
    notes = []
    if any(r.get("clean_fid") is False for r in rows):
        notes.append(CLEAN_FID_NOTE.format(off=f"“{CLEAN_FID_OFF}”"))
    if any(r.get("label") == DEMO_LABEL for r in rows) and (paper := _paper_numbers(reference)):
        notes.append(
            "The paper's numbers, for reference only (never beside a demo number): " + "; ".join(paper) + "."
        )
    return notes


def main_markdown(rows: Sequence[dict[str, Any]], claims: dict[str, Any], reference: dict) -> str:
    out = ["# VM-DDPM reproduction: main results (FID, lower is better)\n\n"]
    if banner := _banner(rows):
        out.append(f"> {banner}\n\n")
    out.append(MAIN_INTRO + "\n")
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        out.append(f"\n## {ds}\n\n")
        out.append(_markdown(main_display(rows, ds)) + "\n")
    if notes := _notes(rows, reference):
        out.append("\n## Notes\n\n" + "".join(f"- {n}\n" for n in notes))
    out.append("\n## Claims (docs/paper.md)\n\n")
    for c in claims.values():
        out.append(f"- **{c['id']}** {c['claim']}: {c['verdict']}\n")
    return "".join(out)


def main_html(rows: Sequence[dict[str, Any]], claims: dict[str, Any], reference: dict) -> str:
    """The main table as an HTML page (Snakemake's report renders it): one captioned table per dataset."""
    parts = []
    if banner := _banner(rows):
        parts.append(f'<p class="demo">{html.escape(banner.replace("**", ""))}</p>')
    parts.append(f"<p>{html.escape(MAIN_INTRO)}</p>")
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        demo = any(r["label"] == DEMO_LABEL for r in rows if r["dataset"] == ds)
        caption = f"{ds}: FID per model, ranked (lower is better)" + (f" — {DEMO_LABEL}" if demo else "")
        parts.append(_html_table(main_display(rows, ds), caption))
    if notes := _notes(rows, reference):
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    items = "".join(
        f"<li><b>{html.escape(c['id'])}</b> {html.escape(c['claim'])}: {html.escape(c['verdict'])}</li>"
        for c in claims.values()
    )
    parts.append(f"<h2>Claims (docs/paper.md)</h2><ul>{items}</ul>")
    return _html_page("VM-DDPM reproduction: main results", parts)


def ablation_display(cfg: Config, rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    header = ["model", "change"] + [f"{ds} FID (Δ)" for ds in cfg.datasets] + ["label"]
    body = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = {r["dataset"]: r for r in rows if r["model"] == model}
        cells = []
        for ds in cfg.datasets:
            r = mine.get(ds, {})
            if r.get("fid") is None:
                cells.append(NOT_RUN)
            elif r.get("fid_minus_vmddpm") is None or model == "vmddpm":
                cells.append(_cell(r["fid"]))
            else:
                cells.append(f"{_cell(r['fid'])} ({r['fid_minus_vmddpm']:+.3g})")
        labels = sorted({r["label"] for r in mine.values() if r["label"]})
        body.append(
            [model, next(iter(mine.values()))["change"], *cells, "; ".join(labels) or "paper protocol"]
        )
    return pd.DataFrame(body, columns=header, dtype=object)


ABLATION_TITLE = "VM-DDPM ablations (FID, lower is better; Δ = preset − full vmddpm)"


def ablation_markdown(cfg: Config, rows: Sequence[dict[str, Any]]) -> str:
    out = [f"# {ABLATION_TITLE}\n\n"]
    if banner := _banner(rows):
        out.append(f"> {banner}\n\n")
    out.append(_markdown(ablation_display(cfg, rows)) + "\n")
    return "".join(out)


def ablation_html(cfg: Config, rows: Sequence[dict[str, Any]]) -> str:
    parts = []
    if banner := _banner(rows):
        parts.append(f'<p class="demo">{html.escape(banner.replace("**", ""))}</p>')
    demo = any(r["label"] == DEMO_LABEL for r in rows)
    caption = "FID of each vmunet-family preset and its difference to the full vmddpm, per dataset" + (
        f" — {DEMO_LABEL}" if demo else ""
    )
    parts.append(_html_table(ablation_display(cfg, rows), caption))
    return _html_page(ABLATION_TITLE, parts)


# ------------------------------------------------------------------------------------------ claims
def claims(cfg: Config, metrics: dict, reference: dict) -> dict[str, Any]:
    """What the tables say about C1-C3, always qualified by whether the numbers are comparable."""

    def fid(ds: str, model: str) -> float | None:
        return _num((metrics.get((ds, model)) or {}).get("fid"))

    def tag(ds: str) -> str:
        demo = any(not is_comparable(m) for (d, _), m in metrics.items() if d == ds)
        return f" ({DEMO_LABEL})" if demo else ""

    c1 = []
    for ds in cfg.datasets:
        m, p = metrics.get((ds, "vmddpm")), reference.get((ds, "vmddpm"), {}).get("value")
        if m is not None and is_comparable(m) and p is not None:
            c1.append(f"{ds} {m['fid']:.4g} vs paper {p:.4g}")
    baselines = [m for m in cfg.models if cfg.preset(m).family != "vmunet"]
    c2, c3 = [], []
    for ds in cfg.datasets:
        ours = fid(ds, "vmddpm")
        others = {b: fid(ds, b) for b in baselines if fid(ds, b) is not None}
        if ours is not None and others:
            beaten = sum(ours < v for v in others.values())
            c2.append(f"{ds}: beats {beaten}/{len(others)}{tag(ds)}")
        csm = fid(ds, "vmddpm_csm")
        if ours is not None and csm is not None:
            c3.append(f"{ds}: {'yes' if ours < csm else 'no'} ({ours:.4g} vs {csm:.4g}){tag(ds)}")
    return {
        "C1": {
            "id": "C1",
            "claim": "VM-DDPM FID 11.783 / 12.513 / 34.525",
            "verdict": (
                "; ".join(c1) if c1 else "no comparable run yet (needs scale=paper and the real Inception)"
            ),
        },
        "C2": {
            "id": "C2",
            "claim": "VM-DDPM beats the baselines",
            "verdict": "; ".join(c2) if c2 else "not run",
        },
        "C3": {
            "id": "C3",
            "claim": "Sequence Regeneration beats the plain CSM",
            "verdict": "; ".join(c3) if c3 else "not run",
        },
    }


def summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """summary.json, the DVC metrics file: numbers only (`dvc exp show` columns), nested
    `fid.<dataset>.<model>` and `kid.<dataset>.<model>`, and how many runs were evaluated."""
    out: dict[str, Any] = {"n_runs": sum(1 for r in rows if _num(r["fid"]) is not None)}
    for key, col in (("fid", "fid"), ("kid", "kid_mean")):
        per: dict[str, dict[str, float]] = {}
        for r in rows:
            if (v := _num(r.get(col))) is not None:
                per.setdefault(r["dataset"], {})[r["model"]] = v
        out[key] = per
    return out


def claims_doc(
    cfg: Config, rows: Sequence[dict[str, Any]], missing: list[str], cl: dict[str, Any]
) -> dict[str, Any]:
    """claims.json: what summary.json's numbers mean (scale, comparability, label), the runs not yet
    evaluated, and the verdict on each claim of docs/paper.md."""
    done = [r for r in rows if r["fid"] is not None]
    comparable = bool(done) and all(r["comparable_to_paper"] for r in done)
    return {
        "scale": cfg.scale,
        "comparable_to_paper": comparable,
        "label": "" if comparable else DEMO_LABEL,
        "not_run": missing,
        "claims": {k: v["verdict"] for k, v in cl.items()},
    }
