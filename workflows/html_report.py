"""``report.html``: one page of the run folder (no server, no network), with its pair figures beside it.

Contents: cohort summary; risk-score histogram; uncertainty vs true error when ground truth is known (both
embedded as PNG data URIs); a table of all pairs (risk first, flagged rows highlighted with their reasons and any
person's rating, failed rows with their error and crash file), sortable by any column and filtered by text and by
status, usable at 10,000 rows; and, for every flagged pair plus the top N by risk (at most ``max_figures``, highest
risk first), three orthogonal slices through the region of highest uncertainty showing the target, the warped
source as a checkerboard with the target, and the ``std_mm`` heat map (colour bar in mm), with per-structure
mean uncertainty when labels exist.

Pair figures are PNG files, ``DIR/figures/<pair_id>.png`` (:mod:`equiqc.workflows.pair_figures`: how and where
they are drawn, their display convention), loaded lazily by the page, so report.html stays small (its size grows
with the table only: about 0.5 kB per pair). Move the run folder as a whole to keep the figures.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from urllib.parse import quote

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

from equiqc.storage.atomic import write_text_atomic  # noqa: E402
from equiqc.storage.decisions import RATINGS  # noqa: E402
from equiqc.storage.report import read_report  # noqa: E402
from equiqc.workflows.pair_figures import draw_in_process, figure_is_current, figure_path  # noqa: E402

plt.rcParams.update({"font.size": 11, "figure.dpi": 100})
COLUMNS = ["pair_id", "subject_id", "status", "risk_score", "flagged", "flag_reasons", "rating", "expected_error_mm",
           "expected_error_upper_mm", "calibration_in_range", "uncertainty_mean_mm", "uncertainty_p95_mm",
           "transform_deviation_p95_mm", "cohort_percentile", "frac_above_2mm", "folding_fraction",
           "true_error_mean_mm", "runtime_s", "error", "crash_file"]

SHOWN_WHEN_SET = ("transform_deviation_p95_mm", "true_error_mean_mm", "expected_error_mm", "expected_error_upper_mm",
                  "calibration_in_range")  # columns of some runs only (given transforms, ground truth, a
# calibration): left out of the table when no pair has a value
OUT_OF_RANGE_NOTE = ("{n} of the pairs lie outside the calibration data's range (column calibration_in_range = "
                     "false): the calibration saw no pair like them, so their upper bound is widened by a stated rule "
                     "(features below the range raised to its minimum, the conformal offset grown by its own size; "
                     "docs/calibration.md). Read their expected error as an extrapolation and look at them.")


def _png_bytes(fig, **kwargs) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", **kwargs)
    plt.close(fig)
    return buf.getvalue()


def _png(fig) -> str:
    return "data:image/png;base64," + base64.b64encode(_png_bytes(fig, bbox_inches="tight")).decode()


def risk_histogram(frame: pd.DataFrame) -> str:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    done = frame[frame.status == "complete"]
    ax.hist(done.risk_score.dropna(), bins=int(np.clip(len(done) // 3, 10, 80)), color="#4c72b0")
    ax.axvline(0, color="#888888", ls="--", label="cohort median")
    ax.set_xlabel("risk score: log2(p95 spread / cohort median), bounded to [-8, 8]")
    ax.set_ylabel("pairs")
    ax.legend(frameon=False)
    return _png(fig)


def error_scatter(frame: pd.DataFrame) -> str | None:
    done = frame[(frame.status == "complete") & frame.true_error_mean_mm.notna()]
    if done.empty:
        return None
    fig, ax = plt.subplots(figsize=(5, 4))
    colours = np.where(done.flagged, "#c44e52", "#4c72b0")
    ax.scatter(done.uncertainty_mean_mm, done.true_error_mean_mm, c=colours, s=30)
    ax.set_xlabel("mean uncertainty std_mm (mm)")
    ax.set_ylabel("true error of the prediction (mm)")
    ax.set_title("red: flagged", fontsize=10)
    return _png(fig)


def _is_false(value) -> bool:
    """A nullable boolean cell that holds False (not NA, not True)."""
    return bool(pd.notna(value)) and not bool(value)


# The three planes shown, in column order, with the patient side at the image's left and right edges.
def _shown_size(figure: Path, width: int = 800) -> str:
    """The ``width`` and ``height`` attributes of a figure shown ``width`` px wide (its aspect kept), so the page
    keeps its layout while lazy images load; only the PNG's header is read."""
    with Image.open(figure) as img:
        return f"width='{width}' height='{round(width * img.height / img.width)}'"


def _fmt(v) -> str:
    if v is None or v is pd.NA or (isinstance(v, float) and not np.isfinite(v)):
        return ""
    if isinstance(v, (float, np.floating)):
        return f"{v:.3f}"
    return html.escape(str(v))


def _cell(column: str, value, drawn: bool = False) -> str:
    if column == "crash_file" and isinstance(value, str) and value:
        return f"<td><a href='{html.escape(value)}'>{html.escape(value)}</a></td>"
    if column == "pair_id" and drawn:  # to its figure's section
        return f"<td><a href='#pair-{html.escape(value)}'>{html.escape(value)}</a></td>"
    return f"<td>{_fmt(value)}</td>"


def _sort_key(value):
    """A cell's sort key for the page's script: the number, or the text (missing values sort as empty text)."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, float, np.integer, np.floating)) and np.isfinite(value):
        return float(value)
    return "" if value is None or value is pd.NA or isinstance(value, float) else str(value)


def _table_rows(frame: pd.DataFrame, cols: list[str], drawn: set[str]) -> str:
    """The table's rows as JSON for the page's script (which shows them a page at a time, sorted and filtered):
    per row the pair id ``p``, its class ``c`` (failed, flagged or none), the cells ``t`` (HTML), their sort keys
    ``k`` and the stored rating ``r``. Safe inside a ``<script>`` element."""
    rows = [{"p": r.pair_id, "c": "failed" if r.status != "complete" else ("flagged" if r.flagged else ""),
             "t": [_cell(c, getattr(r, c), r.pair_id in drawn) for c in cols],
             "k": [_sort_key(getattr(r, c)) for c in cols],
             "r": r.rating if isinstance(getattr(r, "rating", None), str) else ""} for r in frame.itertuples()]
    return json.dumps(rows, separators=(",", ":")).replace("</", "<\\/")


MAX_FIGURES = 500  # pair figures drawn at most (0.3-0.4 s of a worker and 40-60 kB each; the page loads them lazily)


def write_html_report(out_dir: str | Path, top_n: int = 5, meta: dict | None = None,
                      max_figures: int = MAX_FIGURES, draw=draw_in_process) -> Path:
    """Write ``out_dir/report.html`` from ``report.parquet`` and the stored volumes; returns its path.

    Figures are shown for the flagged pairs and the ``top_n`` highest risk scores, highest first, at most
    ``max_figures`` of them; the pairs beyond the cap are listed by name (their rows stay in the table). Those not
    yet drawn (or older than their result) are drawn by ``draw(out_dir, pair_ids) -> {pair_id: error or None}``:
    in this process by default; a run passes one that maps them over its cluster."""
    out_dir = Path(out_dir)
    frame = read_report(out_dir)
    frame = frame.sort_values("risk_score", ascending=False, na_position="first")
    done = frame[frame.status == "complete"]
    chosen = list(dict.fromkeys(list(done[done.flagged].pair_id) + list(done.pair_id[:top_n])))
    chosen, beyond = chosen[:max_figures], chosen[max_figures:]
    errors = draw(out_dir, [pid for pid in chosen if not figure_is_current(out_dir, pid)])
    label_cols = [c for c in frame.columns if c.startswith("uncertainty_mean_mm_")]
    sections, drawn = [], set()
    rows = done.set_index("pair_id")
    for pid in chosen:
        row = rows.loc[pid]
        if errors.get(pid):
            sections.append(f"<h3>{html.escape(pid)}</h3><p>slice views unavailable: {html.escape(errors[pid])}</p>")
            continue
        drawn.add(pid)
        structures = "".join(f"<tr><td>{html.escape(c.removeprefix('uncertainty_mean_mm_'))}</td>"
                             f"<td>{_fmt(row[c])}</td></tr>" for c in label_cols)
        table = (f"<table class='small'><tr><th>structure</th><th>mean std_mm</th></tr>{structures}</table>"
                 if structures else "")
        flag = f" <span class='flag'>flagged: {html.escape(str(row.flag_reasons))}</span>" if row.flagged else ""
        expected = ""
        if "expected_error_mm" in row and pd.notna(row.expected_error_mm):
            expected = (f"; expected error {_fmt(row.expected_error_mm)} mm, upper bound "
                        f"{_fmt(row.expected_error_upper_mm)} mm"
                        + (" (outside the calibration's range: widened)" if _is_false(row.get("calibration_in_range"))
                           else ""))
        sections.append(f"<h3 id='pair-{html.escape(pid)}'>{html.escape(pid)}{flag}</h3>"
                        f"<p>risk {_fmt(row.risk_score)}, mean {_fmt(row.uncertainty_mean_mm)} mm, "
                        f"p95 {_fmt(row.uncertainty_p95_mm)} mm{expected}</p><img alt='{html.escape(pid)} slices' "
                        f"loading='lazy' {_shown_size(out_dir / figure_path(pid))} "
                        f"src='{html.escape(quote(figure_path(pid)))}'>{table}")
    if beyond:
        sections.append(f"<p>{len(beyond)} more pairs to look at are not drawn (at most {max_figures} figures keep "
                        f"the report quick to make): {html.escape(', '.join(beyond))}</p>")
    cols = [c for c in COLUMNS if c in frame.columns and (c not in SHOWN_WHEN_SET or frame[c].notna().any())]
    head = "".join(f"<th onclick='sortTable({i})'>{html.escape(c)}</th>" for i, c in enumerate(cols))
    head += "<th>your rating</th><th>note</th>"
    body = _table_rows(frame, cols, drawn)
    scatter = error_scatter(frame) if "true_error_mean_mm" in frame else None
    meta = meta or {}
    failed = frame[frame.status != "complete"]
    reasons = "".join(f"<li>{html.escape(r.pair_id)}: {html.escape(str(r.error))}</li>"
                      for r in failed.head(MAX_LISTED_FAILURES).itertuples())
    if len(failed) > MAX_LISTED_FAILURES:
        reasons += f"<li>... and {len(failed) - MAX_LISTED_FAILURES} more (filter the table by status)</li>"
    summary = {"pairs": len(frame), "completed": len(done), "failed": len(failed), "flagged": int(done.flagged.sum()),
               **meta}
    outside = int((done["calibration_in_range"] == False).sum()) if "calibration_in_range" in done else 0  # noqa: E712
    notes = f"<p class='note'>{html.escape(OUT_OF_RANGE_NOTE.format(n=outside))}</p>" if outside else ""
    page = TEMPLATE.format(
        summary="".join(f"<tr><th>{html.escape(str(k))}</th><td>{_fmt(v)}</td></tr>" for k, v in summary.items()),
        reasons=(f"<ul>{reasons}</ul>" if reasons else "") + notes,
        hist=f"<img alt='risk histogram' src='{risk_histogram(frame)}'>",
        scatter=f"<img alt='uncertainty vs true error' src='{scatter}'>" if scatter else "",
        head=head, body=body, sections="".join(sections), data=html.escape(json.dumps(chosen)),
        ratings=json.dumps(["", *RATINGS]), page_rows=PAGE_ROWS)
    return write_text_atomic(out_dir / "report.html", page)


MAX_LISTED_FAILURES = 50  # failed pairs listed with their reason above the table (all are in the table)
PAGE_ROWS = 200  # table rows shown at a time: the page stays quick to open, sort and filter at 10,000 pairs


TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>equiqc registration QC report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; font-size: 14px; }}
th {{ background: #f3f3f3; cursor: pointer; }}
tr.flagged td {{ background: #fde2e1; }}
tr.failed td {{ background: #eee; color: #777; }}
.flag {{ background: #c44e52; color: white; padding: 2px 6px; border-radius: 3px; font-size: 13px; }}
img {{ max-width: 100%; }}
table.small td, table.small th {{ font-size: 13px; }}
</style></head>
<body data-shown="{data}">
<h1>Registration QC report</h1>
<h2>Cohort</h2><table>{summary}</table>{reasons}
<h2>Risk scores</h2>{hist}{scatter}
<h2>Pairs</h2><p>Click a column to sort. Red: flagged; grey: failed. Show
<select id="status-filter" onchange="filterTable()"><option value="">all pairs</option>
<option value="flagged">flagged</option><option value="failed">failed</option>
<option value="ok">neither</option></select> matching <input id="text-filter" size="24"
placeholder="pair, subject, reason..." oninput="filterTable()"> <span id="shown"></span>. Rate pairs in the last
columns, then
<label>rater <input id="rater" size="10"></label>
<button id="download" onclick="downloadRatings()">download ratings.tsv</button> and merge it with
<code>equiqc report DIR --ratings ratings.tsv</code>: a rating decides over the flags and is kept.</p>
<p id="pager"><button id="prev" onclick="turn(-1)">previous</button> <span id="range"></span>
<button id="next" onclick="turn(1)">next</button></p>
<table id="pairs"><thead><tr>{head}</tr></thead><tbody></tbody></table>
<script id="rows" type="application/json">{body}</script>
<h2>Flagged and highest-risk pairs</h2>{sections}
<script>
const ROWS = JSON.parse(document.getElementById('rows').textContent);
const RATING_CHOICES = {ratings};
const PAGE_ROWS = {page_rows};
const ratings = {{}}, notes = {{}};  // pair -> a reviewer's rating and note, kept across pages, sorts and filters
ROWS.forEach(r => {{ if (r.r) ratings[r.p] = r.r; r.s = r.t.join(' ').replace(/<[^>]*>/g, ' ').toLowerCase(); }});
let view = ROWS.slice(), page = 0, sortCol = null, ascending = false;
const ESCAPES = {{'&': '&amp;', '<': '&lt;', '>': '&gt;', "'": '&#39;', '"': '&quot;'}};
const esc = s => String(s).replace(/[&<>'"]/g, c => ESCAPES[c]);
function rowHtml(r) {{
  const options = RATING_CHOICES.map(
    v => `<option value='${{v}}'${{v === (ratings[r.p] || '') ? ' selected' : ''}}>${{v || '-'}}</option>`);
  return `<tr class='${{r.c}}' data-pair='${{esc(r.p)}}'>${{r.t.join('')}}` +
         `<td><select class='rating'>${{options.join('')}}</select></td>` +
         `<td><input class='note' size='18' value='${{esc(notes[r.p] || '')}}'></td></tr>`;
}}
function render() {{
  const pages = Math.max(1, Math.ceil(view.length / PAGE_ROWS));
  page = Math.min(Math.max(page, 0), pages - 1);
  const first = page * PAGE_ROWS;
  document.querySelector('#pairs tbody').innerHTML = view.slice(first, first + PAGE_ROWS).map(rowHtml).join('');
  document.getElementById('range').textContent = view.length ?
    `rows ${{first + 1}}-${{Math.min(first + PAGE_ROWS, view.length)}} of ${{view.length}}` : 'no rows';
  document.getElementById('prev').disabled = page === 0;
  document.getElementById('next').disabled = page >= pages - 1;
  document.getElementById('shown').textContent = view.length + ' of ' + ROWS.length + ' shown';
}}
function turn(step) {{ page += step; render(); }}
function order() {{
  if (sortCol === null) return;
  const col = sortCol, sign = ascending ? 1 : -1;
  view.sort((a, b) => {{
    const x = a.k[col], y = b.k[col];
    const c = (typeof x === 'number' && typeof y === 'number') ? x - y : String(x).localeCompare(String(y));
    return sign * c;
  }});
}}
function sortTable(col) {{
  ascending = sortCol === col ? !ascending : false;
  sortCol = col;
  order(); page = 0; render();
}}
function filterTable() {{
  const status = document.getElementById('status-filter').value;
  const text = document.getElementById('text-filter').value.toLowerCase();
  view = ROWS.filter(r => (!status || status === (r.c || 'ok')) && (!text || r.s.includes(text)));
  order(); page = 0; render();
}}
document.querySelector('#pairs tbody').addEventListener('change', e => {{
  if (e.target.matches('select.rating')) ratings[e.target.closest('tr').dataset.pair] = e.target.value;
}});
document.querySelector('#pairs tbody').addEventListener('input', e => {{
  if (e.target.matches('input.note')) notes[e.target.closest('tr').dataset.pair] = e.target.value;
}});
function ratingsTSV() {{
  const rater = document.getElementById('rater').value.replace(/[\\t\\n]/g, ' ');
  const lines = ['pair_id\\trating\\trater\\tnote'];
  ROWS.forEach(r => {{
    const rating = ratings[r.p];
    if (!rating) return;
    const note = (notes[r.p] || '').replace(/[\\t\\n]/g, ' ');
    lines.push([r.p, rating, rater, note].join('\\t'));
  }});
  return lines.join('\\n') + '\\n';
}}
function downloadRatings() {{
  const a = document.createElement('a');
  a.href = URL.createObjectURL(new Blob([ratingsTSV()], {{type: 'text/tab-separated-values'}}));
  a.download = 'ratings.tsv';
  document.body.appendChild(a); a.click(); a.remove();
}}
render();
window.addEventListener('load', () => {{
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.imagesDecoded = ok + '/' + imgs.length;
}});
</script>
</body></html>
"""
