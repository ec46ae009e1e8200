"""Matplotlib for the package's figures: headless (Agg), written atomically as 120-dpi PNGs."""

from __future__ import annotations

from pathlib import Path

from stmdit.provenance import atomic_path


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed), imported when a figure is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> None:
    """Write `fig` to `path` as PNG (atomically: no half-written file) and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
