"""Pictures for the report, each returned as a `data:` URI so the page needs no other file.

Plots use matplotlib's Agg backend (no display); image tiles are composed with Pillow. The anomaly-map
colour scale is the same for every tile, on the normalised scale v (0.5 = threshold): colour position
v / (v + 0.5), so 0 (typical normal) is dark, the threshold sits mid-scale (orange) and maps far above
it (real defects reach 5-10) still differ; below 0.25 the overlay is transparent, it is at most half
opaque so the defect shows through, and a cyan line traces the threshold contour.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # before pyplot: never open a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageOps  # noqa: E402
from scipy import ndimage  # noqa: E402

from engine.report.drift import DriftResult  # noqa: E402

COLORMAP = "inferno"
THRESHOLD = 0.5
_DPI = 110
_MAX_CURVE_POINTS = 600


def data_uri(payload: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


def _figure_uri(fig: plt.Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None})  # one draw: no bbox_inches="tight"
    plt.close(fig)
    return data_uri(buf.getvalue(), "image/png")


def histogram(edges: np.ndarray, hist: np.ndarray, reference: np.ndarray | None, ref_quantiles: dict | None) -> str:
    """Score histogram (bars above the threshold in red), the threshold line, the fit-time normal range."""
    display = 80
    cdf = np.cumsum(hist) / max(hist.sum(), 1)
    lo_bin = int(np.searchsorted(cdf, 0.0005))
    hi_bin = int(np.searchsorted(cdf, 0.9995)) + 1
    lo = min(edges[lo_bin], -0.1 if reference is None or not reference.size else reference.min())
    hi = max(edges[min(hi_bin, len(edges) - 1)], 0.6)
    centres = (edges[:-1] + edges[1:]) / 2
    bins = np.linspace(lo, hi, display + 1)
    counts, _ = np.histogram(np.clip(centres, lo, hi), bins=bins, weights=hist)
    fig, ax = plt.subplots(figsize=(7.5, 3.2), layout="constrained")
    mids, width = (bins[:-1] + bins[1:]) / 2, bins[1] - bins[0]
    above = mids >= THRESHOLD
    ax.bar(mids[~above], counts[~above], width=width, color="#4c72b0", label="scan, below threshold")
    ax.bar(mids[above], counts[above], width=width, color="#c44e52", label="scan, at or above threshold")
    ax.axvline(THRESHOLD, color="black", linestyle="--", linewidth=1.2, label="threshold (0.5)")
    span = None
    if reference is not None and reference.size:
        span = np.quantile(reference, [0.05, 0.95])
    elif ref_quantiles and 0.05 in ref_quantiles and 0.95 in ref_quantiles:
        span = (ref_quantiles[0.05], ref_quantiles[0.95])
    if span is not None:
        ax.axvspan(span[0], span[1], color="#55a868", alpha=0.18, label="fit-time normal scores, 5-95%")
    ax.set_xlabel("score (normalised: 0.5 = threshold)")
    ax.set_ylabel("images")
    ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlim(lo, hi)
    ax.legend(fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return _figure_uri(fig)


def _thin(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if x.size <= _MAX_CURVE_POINTS:
        return x, y
    keep = np.unique(np.linspace(0, x.size - 1, _MAX_CURVE_POINTS).astype(int))
    return x[keep], y[keep]


def roc_pr(curves: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]) -> str:
    """ROC (left) and precision-recall (right); curves: (legend, fpr, tpr, recall, precision), first = all."""
    fig, (ax_roc, ax_pr) = plt.subplots(1, 2, figsize=(9.5, 4.0), layout="constrained")
    for k, (legend, fpr, tpr, recall, precision) in enumerate(curves):
        style = {"color": "black", "linewidth": 2.0} if k == 0 else {"linewidth": 1.2}
        ax_roc.plot(*_thin(fpr, tpr), label=legend, **style)
        ax_pr.plot(*_thin(recall, precision), label=legend.split(",")[0], **style)
    ax_roc.plot([0, 1], [0, 1], color="#999999", linestyle=":", linewidth=1)
    ax_roc.set(xlabel="false-positive rate", ylabel="true-positive rate", title="ROC", xlim=(0, 1), ylim=(0, 1.02))
    ax_pr.set(xlabel="recall", ylabel="precision", title="precision-recall", xlim=(0, 1), ylim=(0, 1.02))
    ax_roc.legend(fontsize=7.5, loc="lower right", frameon=False)
    ax_pr.legend(fontsize=7.5, loc="lower left", frameon=False)
    for ax in (ax_roc, ax_pr):
        ax.spines[["top", "right"]].set_visible(False)
    return _figure_uri(fig)


def drift_plot(result: DriftResult, group_label: str) -> str:
    """Per group: 5-95% whisker, 25-75% box, median dot; flagged groups red; fit-time band in green."""
    groups = result.groups
    fig, ax = plt.subplots(figsize=(9.5, 3.4), layout="constrained")
    x = np.arange(len(groups))
    q = {level: np.array([g.quantiles[level] for g in groups]) for level in (0.05, 0.25, 0.5, 0.75, 0.95)}
    colors = np.array(["#c44e52" if g.flagged else "#4c72b0" for g in groups])
    ax.vlines(x, q[0.05], q[0.95], colors=colors, linewidth=0.8)
    ax.vlines(x, q[0.25], q[0.75], colors=colors, linewidth=max(1.5, min(8.0, 600 / max(len(groups), 1))))
    ax.scatter(x, q[0.5], color="white", edgecolors=colors, s=12, zorder=3, linewidths=0.8)
    ref = result.reference_quantiles
    if ref and 0.25 in ref and 0.75 in ref:
        ax.axhspan(ref[0.25], ref[0.75], color="#55a868", alpha=0.2, label="fit-time normal, 25-75%")
    if ref and 0.5 in ref:
        ax.axhline(ref[0.5], color="#55a868", linewidth=1.2, label="fit-time normal, median")
    ax.axhline(THRESHOLD, color="black", linestyle="--", linewidth=1, label="threshold (0.5)")
    ax.set_xlabel(group_label)
    ax.set_ylabel("score (0.5 = threshold)")
    if len(groups) <= 30:
        ax.set_xticks(x, [g.name[-18:] for g in groups], rotation=45 if len(groups) > 8 else 0, ha="right" if len(groups) > 8 else "center", fontsize=7)
    ax.set_xlim(-0.8, len(groups) - 0.2)
    ax.legend(fontsize=8, frameon=False, loc="upper left")
    ax.spines[["top", "right"]].set_visible(False)
    return _figure_uri(fig)


_CMAP = matplotlib.colormaps[COLORMAP]


def colour_position(values: np.ndarray) -> np.ndarray:
    """Normalised map values -> [0, 1) colour positions; 0.5 (the threshold) -> 0.5."""
    v = np.clip(values, 0.0, None)
    return v / (v + 0.5)


def colour_scale_css() -> str:
    """A CSS linear-gradient of the map colour scale over colour positions [0, 1]."""
    stops = []
    for v in np.linspace(0, 1, 9):
        r, g, b, _ = _CMAP(v)
        stops.append(f"rgb({int(r * 255)},{int(g * 255)},{int(b * 255)}) {int(v * 100)}%")
    return "linear-gradient(to right, " + ", ".join(stops) + ")"


def load_thumbnail(path: str | Path, box: int) -> np.ndarray | None:
    """RGB uint8 of an image, at most about 2*box on a side; None where it cannot be read.

    Draft mode lets JPEG decode at 1/2..1/8 scale, so a 100-megapixel survey image costs little; EXIF
    orientation is applied as the scan applies it. High-bit-depth and float images are scaled to 8 bits.
    """
    try:
        with Image.open(path) as img:
            img.draft("RGB", (box * 2, box * 2))
            img = ImageOps.exif_transpose(img)
            img.thumbnail((box * 2, box * 2))
            if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                values = np.asarray(img, dtype=np.float64)
                lo, hi = float(values.min()), float(values.max())
                grey = np.zeros_like(values) if hi <= lo else (values - lo) / (hi - lo) * 255.0
                return np.repeat(grey.astype(np.uint8)[:, :, None], 3, axis=2)
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def _fit(size: tuple[int, int], box: int) -> tuple[int, int]:
    w, h = size
    scale = box / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def tile(rgb: np.ndarray | None, amap: np.ndarray | None, box: int = 164) -> str:
    """Image and its map overlay side by side, as a JPEG data URI. Missing image: the map on grey."""
    if rgb is not None:
        picture = Image.fromarray(rgb)
        picture = picture.resize(_fit(picture.size, box), Image.Resampling.BILINEAR)
    else:
        picture = Image.new("RGB", (box, box), (90, 90, 90))
        ImageDraw.Draw(picture).text((8, box // 2 - 6), "image not found", fill=(230, 230, 230))
    overlay = picture.copy()
    if amap is not None:
        values = np.nan_to_num(np.asarray(amap, dtype=np.float32), nan=0.0)
        values = np.asarray(Image.fromarray(values).resize(picture.size, Image.Resampling.BILINEAR))
        colours = (_CMAP(colour_position(values))[..., :3] * 255).astype(np.float32)
        alpha = np.clip((values - 0.25) * 1.6, 0.0, 0.5)[..., None]
        blended = np.asarray(picture, dtype=np.float32) * (1 - alpha) + colours * alpha
        above = values >= THRESHOLD
        blended[above & ~ndimage.binary_erosion(above, border_value=1)] = (80, 220, 255)  # threshold contour
        overlay = Image.fromarray(blended.astype(np.uint8))
    canvas = Image.new("RGB", (picture.width * 2 + 4, picture.height), (255, 255, 255))
    canvas.paste(picture, (0, 0))
    canvas.paste(overlay, (picture.width + 4, 0))
    buf = io.BytesIO()
    canvas.save(buf, format="JPEG", quality=85)
    return data_uri(buf.getvalue(), "image/jpeg")
