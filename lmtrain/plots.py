"""PNG plots drawn with matplotlib's Agg canvas (no display, no pyplot state), returned as data URIs that an
HTML report embeds or a caller writes out: the confusion matrix of a classifier's evaluation, which the classify
task draws at the end of training and `lmtrain eval`'s report shows.

matplotlib is imported when a plot is drawn: it is heavy, and most runs never draw one.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import numpy as np


def png_data_uri(fig) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def confusion_matrix_png(counts: Sequence[Sequence[int]], labels: Sequence[str], title: str) -> str:
    """Heatmap of counts[true, predicted], coloured by the share of each true class so rare classes show too."""
    from matplotlib.figure import Figure

    counts_CxC = np.asarray(counts)
    n = len(labels)
    row_share = counts_CxC / np.maximum(counts_CxC.sum(axis=1, keepdims=True), 1)
    side = min(2.5 + 0.55 * n, 12)
    fig = Figure(figsize=(side + 1.2, side))
    ax = fig.subplots()
    im = ax.imshow(row_share, cmap="Blues", vmin=0, vmax=1)
    short = [lb if len(lb) <= 14 else lb[:13] + "…" for lb in labels]
    ax.set_xticks(range(n), short, rotation=45 if n > 3 else 0, ha="right" if n > 3 else "center")
    ax.set_yticks(range(n), short)
    ax.set(xlabel="predicted", ylabel="true", title=f"Confusion matrix: {title}")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(int(counts_CxC[i, j])), ha="center", va="center", fontsize=8 if n > 12 else 10,
                        color="white" if row_share[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    fig.tight_layout()
    return png_data_uri(fig)
