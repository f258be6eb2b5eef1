"""The pair figure of the HTML report: ``DIR/figures/<pair_id>.png``, drawn from a pair's stores with Pillow.

Three orthogonal slices through the region of highest uncertainty: the target, the warped source as a
checkerboard with the target, the ``std_mm`` heat map and, when the run's calibration made one, the ``error_mm``
heat map (one colour bar in mm for both). Drawn where the pairs were computed
(a run draws them on its cluster's workers, in parallel, before the cluster closes; ``equiqc report`` draws those
missing or older than their pair's result in its own process). A module of its own so that a worker drawing
figures imports neither matplotlib's pyplot nor the report page's table and decision code (2-3 s of imports per
worker process, once per run).

Display convention (arrays are RAS+): axial and coronal views are shown in neurological orientation
(patient left on the left of the image, labelled L/R), anterior up in axial views, superior up in coronal
and sagittal views; sagittal views have anterior on the right.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw, ImageFont
from scipy.ndimage import uniform_filter

from equiqc.pipeline import transforms as T
from equiqc.storage.atomic import write_bytes_atomic
from equiqc.storage.cohort import read_pair
from equiqc.storage.results import ResultNotFound, read_array
from equiqc.storage.run_folder import cohort_store, results_store

FIGURES = "figures"  # DIR/figures/<pair_id>.png

PLANES = (("axial", ("L", "R")), ("coronal", ("L", "R")), ("sagittal", ("P", "A")))


def _views(volume: np.ndarray, centre: tuple[int, int, int]) -> list[np.ndarray]:
    """The slices of ``volume`` ``(X, Y, Z, ...)`` through ``centre`` in :data:`PLANES` order, each ``(rows, columns,
    ...)`` with the first row at the bottom (origin='lower')."""
    x, y, z = centre
    return [np.swapaxes(volume[:, :, z], 0, 1), np.swapaxes(volume[:, y, :], 0, 1), np.swapaxes(volume[x], 0, 1)]


def _checkerboard(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
    idx = np.indices(a.shape)
    size = max(1, min(a.shape) // tiles)
    mask = (sum(i // size for i in idx) % 2).astype(bool)
    return np.where(mask, a, b)


def pair_figure(results_root: Path, cohort_root: Path, pair_id: str) -> bytes:
    """Target / checkerboard of warped source and target / std_mm, in three planes through the peak, as PNG
    bytes."""
    std, _ = read_array(results_root, pair_id, "std_mm")
    vols = read_pair(cohort_root, pair_id, ("source", "target", "target_mask"))
    norm = lambda v: v / max(np.percentile(v, 99.5), 1e-6)  # noqa: E731
    anatomy = norm(vols["target"].data)
    try:
        pred, _ = read_array(results_root, pair_id, "prediction_map")
        warped = T.warp(torch.as_tensor(vols["source"].data)[None, None], torch.as_tensor(pred)[None])[0, 0].numpy()
        middle = ("warped source | target", _checkerboard(norm(warped), anatomy))
    except ResultNotFound:  # --store minimal keeps no prediction: show the target alone, and say so
        middle = ("target (prediction not stored: --store minimal)", anatomy)
    # the region QC is about: the target mask, else the target's head (not the empty background)
    region = vols["target_mask"].data > 0 if "target_mask" in vols else anatomy > 0.1
    region &= np.isfinite(std)
    shown = np.where(region, std, np.nan)
    smooth = uniform_filter(np.nan_to_num(shown, nan=0.0), size=5)
    centre = np.unravel_index(int(np.argmax(smooth)), std.shape)
    heats = {"std_mm": shown}
    try:  # the calibrated per-voxel error estimate, when the run's calibration made one: a row of its own
        heats["error_mm (calibrated estimate)"] = np.where(region, read_array(results_root, pair_id, "error_mm")[0],
                                                           np.nan)
    except ResultNotFound:
        pass
    vmax = max(max(float(np.nanpercentile(h, 99)) for h in heats.values()) if region.any() else 1.0, 1e-6)
    # coloured plane by plane, not as whole volumes; in the heat rows, voxels outside the region show the anatomy
    # dimmed; one colour scale (mm) for every heat row
    planes = _views(anatomy, centre)
    rows = [("target", [_coloured("gray", a) for a in planes]),
            (middle[0], [_coloured("gray", m) for m in _views(middle[1], centre)])]
    for title, volume in heats.items():
        rows.append((title, [np.where(np.isfinite(s)[..., None], _coloured("magma", np.nan_to_num(s) / vmax),
                                      _coloured("gray", a / 2.5))
                             for s, a in zip(_views(volume, centre), planes, strict=True)]))
    return _mosaic_png(pair_id, centre, rows, vmax, ", ".join(k.split()[0] for k in heats) + " (mm)")


# The pair figure is composed with Pillow (panels pasted at one zoom for all, nearest-neighbour, titles and the
# colour bar's labels as text): matplotlib drew the same page in about 0.25 s, mostly its text and axis
# machinery, which at a few hundred flagged pairs was most of a cohort run's report time; the panels are images,
# not plots.
FIGURE_WIDTH = 680  # px, the PNG's width; report.html shows it 800 px wide
_PAD, _GAP, _BAR = 8, 12, 90  # px: margins, gap between panels, room for the colour bar and its labels


@functools.cache
def _font(size: int = 12) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)  # Pillow's own scalable font: nothing to find or download


@functools.cache
def _lut(name: str) -> np.ndarray:
    """matplotlib's colour map ``name`` as 256 RGBA uint8 entries."""
    return (matplotlib.colormaps[name](np.linspace(0, 1, 256)) * 255).round().astype(np.uint8)


def _coloured(name: str, values: np.ndarray) -> np.ndarray:
    """``values`` in [0, 1] (clipped) through colour map ``name``: RGBA uint8 with one more trailing axis."""
    return _lut(name)[np.round(np.clip(values, 0, 1) * 255).astype(np.intp)]


def _mosaic_png(pair_id: str, centre: tuple[int, ...], rows: list[tuple[str, list[np.ndarray]]], vmax: float,
                unit_label: str = "std_mm (mm)") -> bytes:
    """The rows x 3 panels (rows of RGBA uint8 slices ``(rows, columns, 4)``, origin at the bottom; columns: axial,
    coronal, sagittal through ``centre``) with their titles, orientation labels and the std_mm colour bar, as PNG
    bytes ``FIGURE_WIDTH`` wide."""
    widths = [max(r[1][c].shape[1] for r in rows) for c in range(3)]
    heights = [max(img.shape[0] for img in r[1]) for r in rows]
    zoom = (FIGURE_WIDTH - 2 * _PAD - 2 * _GAP - _BAR) / sum(widths)  # px per voxel, every panel alike
    font, line = _font(), _font().size + 6
    size = (FIGURE_WIDTH, line + sum(2 * line + round(h * zoom) + _GAP for h in heights) + _PAD)
    page = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(page)
    draw.text((size[0] // 2, _PAD), f"{pair_id}: slices through the region of highest uncertainty (voxel "
              f"{tuple(map(int, centre))})", fill="black", font=font, anchor="mt")
    y = line
    for r, (title, slices) in enumerate(rows):
        draw.text((_PAD, y + line), title, fill="black", font=_font(13), anchor="ld")
        y += line
        x = _PAD
        for c, img in enumerate(slices):
            h, w = round(img.shape[0] * zoom), round(img.shape[1] * zoom)
            draw.text((x, y + line - 3), PLANES[c][0], fill="#555555", font=font, anchor="ld")
            panel = Image.fromarray(np.ascontiguousarray(np.flipud(img)), "RGBA").resize((w, h), Image.NEAREST)
            page.paste(panel.convert("RGB"), (x, y + line))
            if r == 0:  # the orientation, the same in every row: labelled once per column
                left, right = PLANES[c][1]
                draw.text((x + 3, y + line + h // 2), left, fill="yellow", font=font, anchor="lm", stroke_width=1,
                          stroke_fill="black")
                draw.text((x + w - 3, y + line + h // 2), right, fill="yellow", font=font, anchor="rm",
                          stroke_width=1, stroke_fill="black")
            x += round(widths[c] * zoom) + _GAP
        if r == len(rows) - 1:
            _colour_bar(page, draw, (x + 4, y + line), round(heights[r] * zoom), vmax, unit_label)
        y += line + round(heights[r] * zoom) + _GAP
    buf = io.BytesIO()
    page.save(buf, format="PNG")
    return buf.getvalue()


def _colour_bar(page: Image.Image, draw: ImageDraw.ImageDraw, corner: tuple[int, int], height: int,
                vmax: float, text: str = "std_mm (mm)") -> None:
    """The magma scale from 0 (bottom) to ``vmax`` mm (top), ``height`` px tall from ``corner``, with ticks at
    matplotlib's round values and the label ``text``."""
    x, y = corner
    strip = _coloured("magma", np.linspace(1, 0, max(height, 2)))[:, None].repeat(14, axis=1)
    page.paste(Image.fromarray(np.ascontiguousarray(strip), "RGBA").convert("RGB"), (x, y))
    draw.rectangle((x, y, x + 13, y + height - 1), outline="black")
    for tick in MaxNLocator(nbins=5).tick_values(0, vmax):
        if 0 <= tick <= vmax * (1 + 1e-9):
            ty = y + round((height - 1) * (1 - tick / vmax))
            draw.line((x + 14, ty, x + 17, ty), fill="black")
            draw.text((x + 20, ty), f"{tick:g}", fill="black", font=_font(11), anchor="lm")
    label = Image.new("RGB", (round(draw.textlength(text, font=_font(11))) + 2, 14), "white")
    ImageDraw.Draw(label).text((1, 7), text, fill="black", font=_font(11), anchor="lm")
    rotated = label.rotate(90, expand=True)
    page.paste(rotated, (x + 56, y + max(0, (height - rotated.height) // 2)))


def figure_path(pair_id: str) -> str:
    """A pair figure's path relative to the run folder."""
    return f"{FIGURES}/{pair_id}.png"


def figure_is_current(out_dir: Path, pair_id: str) -> bool:
    """Whether the pair's figure exists and is newer than its stored result (the result's ``zarr.json``, rewritten
    with every completion marker)."""
    figure, result = out_dir / figure_path(pair_id), results_store(out_dir) / pair_id / "zarr.json"
    try:
        return figure.stat().st_mtime_ns >= result.stat().st_mtime_ns
    except FileNotFoundError:
        return False


def draw_pair_figure(out_dir: str | Path, pair_id: str) -> str | None:
    """Draw one pair's figure into ``DIR/figures/<pair_id>.png``; returns None, or why it could not be drawn (a
    missing volume must not cost the rest of the report). Runs on a worker or in the client."""
    out_dir = Path(out_dir)
    try:
        png = pair_figure(results_store(out_dir), cohort_store(out_dir), pair_id)
        write_bytes_atomic(out_dir / figure_path(pair_id), png)
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def draw_in_process(out_dir: Path, pair_ids: list[str]) -> dict[str, str | None]:
    """:func:`draw_pair_figure` for each pair, one after another (``equiqc report``, which has no cluster)."""
    return {pid: draw_pair_figure(out_dir, pid) for pid in pair_ids}
