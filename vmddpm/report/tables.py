"""The report's tables: rows, claims and the summary from metrics and the paper's numbers (no file I/O).

* A missing evaluation is a row that says "not run", never a crash: the report of a half-finished
  matrix is still useful.
* Demo-scale or random-extractor numbers are labelled "demo — not comparable to the paper" in every
  table row and header, and never enter the comparison with the paper (`fid_minus_paper` stays empty);
  the rule is `vmddpm.contracts.is_comparable`.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from typing import Any

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
            row["fid_paper"] = ref.get("value")
            row["paper_source"] = ref.get("source") if ref.get("value") is not None else None
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
                if comparable and row["fid_paper"] is not None:
                    row["fid_minus_paper"] = float(m["fid"]) - row["fid_paper"]
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
                    "fid_paper": reference.get((ds, model), {}).get("value"),
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


def to_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    return buf.getvalue()


def _md_table(header: Sequence[str], body: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines)


def _banner(rows: Sequence[dict[str, Any]]) -> str:
    demo = [r for r in rows if r.get("label") == DEMO_LABEL]
    if not demo:
        return ""
    why = sorted({f"scale={r.get('scale')}, extractor={r.get('extractor')}" for r in demo})
    return (
        f"> **{DEMO_LABEL.upper()}**: {len(demo)} of these rows were computed at {'; '.join(why)}. "
        "They check that the pipeline runs end to end; they say nothing about the paper's claims. "
        "The paper's numbers are shown for reference only and no difference to them is computed.\n\n"
    )


def _protocol(r: dict[str, Any]) -> str:
    if r.get("extractor") is None:
        return ""
    sha = str(r.get("weights_sha256") or "")[:8]
    steps = f" {r['steps']} steps" if r.get("steps") not in (None, "") else ""
    return f"{r['extractor']} ({sha}), {r.get('sampler')}{steps}, seed {r.get('seed')}, {r.get('scale')}"


def main_markdown(rows: Sequence[dict[str, Any]], claims: dict[str, Any]) -> str:
    out = ["# VM-DDPM reproduction: main results (FID, lower is better)\n\n"]
    out.append(_banner(rows))
    out.append(
        "Ours: FID of `n_fake` generated images against the `n_real` reference images (torch-fidelity "
        "Inception-v3 pool features); clean-fid = the same with clean-fid's resize; floor = FID between "
        "two halves of the real set (what real data scores at this N); memorised = share of generated "
        "images within the memorisation threshold of a training image. Paper: arXiv:2405.05667; "
        "empty = not stated in the material we have.\n"
    )
    header = [
        "rank", "model", "FID (ours)", "FID (paper)", "ours − paper", "KID", "clean-fid FID",
        "real floor", "memorised", "n real / fake", "protocol", "label",
    ]  # fmt: skip
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        out.append(f"\n## {ds}\n")
        body = []
        for r in (r for r in rows if r["dataset"] == ds):
            kid = (
                "" if r.get("kid_mean") is None else f"{_cell(r['kid_mean'])} ± {_cell(r.get('kid_std'), 2)}"
            )
            n = "" if r.get("n_real") is None else f"{r['n_real']} / {r['n_fake']}"
            mem = "" if r.get("memorised_share") is None else f"{100 * r['memorised_share']:.1f}%"
            body.append(
                [
                    _cell(r["rank"]),
                    r["model"],
                    _cell(r["fid"]),
                    _cell(r["fid_paper"]),
                    _cell(r["fid_minus_paper"]),
                    kid,
                    _cell(r["fid_clean"]),
                    _cell(r["fid_real_floor"]),
                    mem,
                    n,
                    _protocol(r),
                    r["label"] or "paper protocol",
                ]
            )
        out.append(_md_table(header, body) + "\n")
    out.append("\n## Claims (docs/paper.md)\n")
    for c in claims.values():
        out.append(f"- **{c['id']}** {c['claim']}: {c['verdict']}\n")
    return "".join(out)


def ablation_markdown(cfg: Config, rows: Sequence[dict[str, Any]]) -> str:
    out = ["# VM-DDPM ablations (FID, lower is better; Δ = preset − full vmddpm)\n\n", _banner(rows)]
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
    out.append(_md_table(header, body) + "\n")
    return "".join(out)


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


def summary(
    cfg: Config, rows: Sequence[dict[str, Any]], missing: list[str], cl: dict[str, Any]
) -> dict[str, Any]:
    """Machine-readable (DVC metrics): nested dataset -> model -> numbers; missing runs listed."""
    per: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["fid"] is None:
            continue
        per.setdefault(r["dataset"], {})[r["model"]] = {
            k: r[k]
            for k in ("fid", "kid_mean", "kid_std", "fid_clean", "fid_real_floor", "memorised_share", "rank")
            if _num(r.get(k)) is not None
        }
    done = [r for r in rows if r["fid"] is not None]
    comparable = bool(done) and all(r["comparable_to_paper"] for r in done)
    return {
        "scale": cfg.scale,
        "comparable_to_paper": comparable,
        "label": "" if comparable else DEMO_LABEL,
        "n_runs": len(done),
        "not_run": missing,
        "fid": per,
        "claims": {k: v["verdict"] for k, v in cl.items()},
    }
