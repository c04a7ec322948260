"""The reader study's figure (`scores.png`): per reader, telling synthetic from real against chance, and
mean ratings of real vs synthetic images (the two things a reader study is read for)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vmddpm.plotting import pyplot, save, title
from vmddpm.readerstudy.format import CHANCE, REAL, SYNTHETIC


def scores_figure(s: dict[str, Any], path: Path) -> Path:
    """Per reader: accuracy / sensitivity / specificity against chance, and mean ratings of real
    vs synthetic images (the two things a reader study is read for)."""
    plt = pyplot()
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
    heading = (
        f"Reader study {s['study_id']}: {s['dataset']} / {s['model']} "
        f"({s['n_real']} real, {s['n_fake']} synthetic)"
    )
    title(fig, heading, s.get("scale") == "demo")
    fig.tight_layout()
    return save(fig, path, dpi=110, bbox_inches="tight")
