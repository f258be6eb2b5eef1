"""report.html at 10,000 pairs: its size, the time to write it, and how quickly a browser sorts and filters it.

    python benchmarks/report_scale.py --run DIR --pairs 10000

Takes a finished run folder (``benchmarks/cohort_scale.py --work W`` leaves one in ``W/run``), repeats its report
rows under new pair ids up to ``--pairs`` rows (the figures are those of the run: the repeated rows are neither
flagged nor drawn), writes report.html into a new folder and loads it in headless Chromium through the DevTools
protocol (tests/test_html_report.py's driver): milliseconds to parse and lay out the page, to sort it by risk
score, and to filter it by status and by text. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="a finished run folder")
    p.add_argument("--pairs", type=int, default=10_000)
    args = p.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from test_html_report import DevTools, chromium

    from equiqc.workflows.html_report import write_html_report

    work = Path(tempfile.mkdtemp(prefix="equiqc-report-"))
    frame = pd.read_parquet(args.run / "report.parquet")
    copies = []
    for i in range(-(-args.pairs // len(frame))):
        part = frame.copy()
        if i:
            part["pair_id"] = part.pair_id + f"-copy{i}"
            part["flagged"] = False
            part["flag_reasons"] = ""
        copies.append(part)
    big = pd.concat(copies, ignore_index=True).head(args.pairs)
    big.to_parquet(work / "report.parquet")
    for name in ("results.zarr", "cohort.zarr", "figures"):
        if (args.run / name).exists():
            (work / name).symlink_to((args.run / name).resolve())
    start = time.perf_counter()
    page = write_html_report(work, meta={"benchmark": "report_scale"})
    written = time.perf_counter() - start

    tools = DevTools(chromium(), work / "profile")
    try:
        start = time.perf_counter()
        session = tools.open(page.as_uri())
        loaded = time.perf_counter() - start
        timings = tools.evaluate(session, """(() => {
            const t = () => performance.now();
            const heads = [...document.querySelectorAll('#pairs thead th')];
            const risk = heads.findIndex(h => h.textContent === 'risk_score');
            let a = t(); sortTable(risk); document.body.offsetHeight; const sort = t() - a;
            a = t(); document.getElementById('status-filter').value = 'flagged'; filterTable();
            document.body.offsetHeight; const status = t() - a;
            a = t(); document.getElementById('status-filter').value = '';
            document.getElementById('text-filter').value = 'sub-0001'; filterTable(); document.body.offsetHeight;
            const text = t() - a;
            return {rows_drawn_after_filters: document.querySelectorAll('#pairs tbody tr').length, sort_ms: sort,
                    filter_status_ms: status,
                    filter_text_ms: text, shown: document.getElementById('shown').textContent};
        })()""")
    finally:
        tools.close()
    print(json.dumps({"command": f"python benchmarks/report_scale.py --run {args.run} --pairs {args.pairs}",
                      "pairs": args.pairs, "report_html_MB": round(page.stat().st_size / 1e6, 2),
                      "write_s": round(written, 2), "open_in_chromium_s": round(loaded, 2),
                      **{k: round(v, 1) if isinstance(v, float) else v for k, v in timings.items()}}))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
