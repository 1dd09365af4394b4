"""A PNG of the kept width of every layer, one panel per group kind (saved next to the model).

Uniform allocation gives flat lines; global allocation and learned masks show which layers
kept more. Needs matplotlib (the ``plot`` extra); :func:`plot_widths` says so when it is missing.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import GraphpruneError
from .plan import atomic_write


def _rows(report) -> tuple[list[str], dict[str, list[tuple[int, int] | None]]]:
    """Block names, and for each kind the (kept, total) per block (None where a block has none)."""
    per_layer = report.per_layer()
    blocks = [r["block"] for r in per_layer]
    kinds = sorted({g[1] for g in report.groups})
    return blocks, {k: [r.get(k) for r in per_layer] for k in kinds}


def plot_widths(report, path: str | os.PathLike, title: str | None = None) -> Path:
    """Draw kept units per layer (absolute, and as a fraction of the original) into ``path`` (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise GraphpruneError("plotting needs matplotlib: pip install 'graphprune[plot]'") from exc
    blocks, kinds = _rows(report)
    if not kinds:
        raise GraphpruneError("the report has no pruned groups to plot")
    path = Path(path)
    fig, axes = plt.subplots(len(kinds), 1, figsize=(max(6.0, 0.35 * len(blocks) + 2), 2.4 * len(kinds) + 0.6), squeeze=False)
    x = list(range(len(blocks)))
    for ax, (kind, cells) in zip(axes[:, 0], kinds.items()):
        kept = [c[0] if c else 0 for c in cells]
        total = [c[1] if c else 0 for c in cells]
        ax.bar(x, total, color="#d9d9d9", label="original")
        ax.bar(x, kept, color="#3b75af", label="kept")
        for xi, k, t in zip(x, kept, total):
            if t:
                ax.text(xi, k, f"{k / t:.0%}", ha="center", va="bottom", fontsize=7)
        ax.set_ylabel(kind)
        ax.set_ylim(0, max(total + [1]) * 1.25)  # room for the labels and the legend
        ax.set_xticks(x)
        ax.set_xticklabels([b.rsplit(".", 1)[-1] if b != "(global)" else "global" for b in blocks], fontsize=7)
        ax.legend(loc="upper left", fontsize=7, frameon=False, ncol=2)
    axes[-1, 0].set_xlabel("layer")
    fig.suptitle(title or f"{report.method}: kept widths per layer (achieved {report.achieved_ratio:.1%} of block params)", fontsize=9)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110), suffix=".png")
    finally:
        plt.close(fig)
    return path
