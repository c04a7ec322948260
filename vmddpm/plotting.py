"""The one plotting helper of the project: the report's figures, the reader study's and the benchmarks'.

matplotlib with the Agg backend (no display), imported only when a figure is drawn; figures are saved
atomically (`vmddpm.io.atomic_path`), so a killed run never leaves half a PNG; demo numbers get the demo
label in the title; every model keeps one colour across figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vmddpm.contracts import DEMO_LABEL
from vmddpm.io import atomic_path


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: str | Path, *, dpi: int = 110, **savefig: Any) -> Path:
    """Write `fig` to `path` atomically (format from the suffix) and close it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, **savefig)
    pyplot().close(fig)
    return path


def note(ax: Any, text: str) -> None:
    """A grey note in place of an empty panel."""
    ax.text(
        0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=9, transform=ax.transAxes, color="0.3"
    )
    ax.set_xticks([])
    ax.set_yticks([])


def title(fig: Any, text: str, demo: bool, label: str = DEMO_LABEL) -> None:
    """The figure title; with demo numbers, the demo label (or another not-comparable `label`, e.g. the
    showcase's) below it in red."""
    fig.suptitle(text + (f"\n{label.upper()}" if demo else ""), color="darkred" if demo else "black")


def model_colors(models: Sequence[str]) -> dict[str, Any]:
    """One fixed colour per model across every figure (by position in `models:`: tab10, then tab20b)."""
    plt = pyplot()
    palette = [plt.get_cmap("tab10")(i) for i in range(10)] + [plt.get_cmap("tab20b")(i) for i in range(20)]
    return {m: palette[i % len(palette)] for i, m in enumerate(models)}
