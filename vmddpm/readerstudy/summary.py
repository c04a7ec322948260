"""The reader study's Markdown summary (`summary.md`): the numbers of scores.json, rounded, in words."""

from __future__ import annotations

from typing import Any

from vmddpm.contracts import DEMO_LABEL
from vmddpm.readerstudy.format import REAL, SYNTHETIC


def fmt(x: float | None, digits: int = 3) -> str:
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
            f"{fmt(r['sensitivity'])} | {fmt(r['specificity'])} | "
            f"{fmt(r['realism'][REAL], 2)} / {fmt(r['realism'][SYNTHETIC], 2)} | "
            f"{fmt(r['plausibility'][REAL], 2)} / {fmt(r['plausibility'][SYNTHETIC], 2)} |"
        )
    a = s["agreement"]
    lines.append("")
    if a["method"] == "cohen":
        lines.append(f"Inter-reader agreement on real/synthetic: Cohen's kappa = {fmt(a['kappa'])}.")
    elif a["method"] == "fleiss":
        lines.append(
            f"Inter-reader agreement on real/synthetic: Fleiss' kappa = {fmt(a['kappa'])} "
            f"({a['n_readers']} readers)."
        )
        lines.append("")
        lines.append(
            "Pairwise Cohen's kappa: "
            + "; ".join(f"{p['a']}–{p['b']} {fmt(p['kappa'])}" for p in a["pairwise_cohen"])
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
