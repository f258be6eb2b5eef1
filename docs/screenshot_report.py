"""Take the documentation's picture of report.html from a real demo run, in headless Chromium.

    python docs/screenshot_report.py                      # equiqc demo (20 pairs), then docs/_static/report.png
    python docs/screenshot_report.py --run-dir demo-out   # the report of a run folder you already have

Needs Debian's ``chromium`` (``apt-get install chromium``; .ci/run installs it). The picture is the report's title and
the top of its pairs table (the run's metadata and the risk-score plots above it are hidden in a copy of the page
made for the picture; the page itself is not changed), 1280 x 1000 px, stored as a 256-colour PNG so that it stays
small in git. Re-run it whenever report.html changes; tests/test_docs.py runs it on a small demo.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
# Headless, no sandbox (CI runs as root), and none of Chromium's background connections (the network is closed).
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--virtual-time-budget=10000", "--hide-scrollbars"]
# Hides the page's sections between its title and the pairs table (the cohort's metadata, the risk-score plots).
PAIRS_FIRST = """<script>(() => { let hide = false; for (const el of [...document.body.children]) {
  if (el.tagName === 'H2') hide = !el.textContent.startsWith('Pairs');
  if (hide && el.tagName !== 'SCRIPT') el.style.display = 'none'; } })();</script>"""


def chromium_path() -> str | None:
    """Chromium's executable (Debian names it ``chromium``, others ``chromium-browser``), or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def find_chromium() -> str:
    exe = chromium_path()
    if exe is None:
        raise SystemExit("screenshot_report: chromium is not installed (apt-get install chromium)")
    return exe


def screenshot(html: Path, png: Path, width: int = 1280, height: int = 1000) -> Path:
    """``png``: Chromium's rendering of the page ``html`` in a ``width`` x ``height`` window (pixels), with a
    fresh profile."""
    with tempfile.TemporaryDirectory() as scratch:
        done = subprocess.run([find_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={Path(scratch) / 'profile'}",
                               f"--window-size={width},{height}", f"--screenshot={png}", html.resolve().as_uri()],
                              capture_output=True, text=True, timeout=120)
    if not png.exists():
        raise SystemExit(f"screenshot_report: chromium wrote no picture of {html}:\n{done.stderr[-2000:]}")
    return png


def demo_run(folder: Path, pairs: int, samples: int | None) -> Path:
    """Run ``equiqc demo`` into ``folder``; its report.html."""
    extra = ["--samples", str(samples)] if samples else []
    subprocess.run([sys.executable, "-m", "equiqc.workflows.cli", "-q", "demo", "--out", str(folder), "--pairs",
                    str(pairs), *extra], check=True, stdout=subprocess.DEVNULL)
    return folder / "report.html"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "_static" / "report.png", help="the PNG to write")
    parser.add_argument("--run-dir", type=Path, help="an existing run folder (default: run equiqc demo first)")
    parser.add_argument("--pairs", type=int, default=20, help="the demo's pairs (default 20, as equiqc demo)")
    parser.add_argument("--samples", type=int, help="the demo's K (default: the model's)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        html = (args.run_dir / "report.html") if args.run_dir else demo_run(Path(scratch) / "demo", args.pairs,
                                                                              args.samples)
        if not html.is_file():
            raise SystemExit(f"screenshot_report: no report.html in {html.parent}")
        framed = html.with_name(".screenshot-report.html")  # beside the report: its figures' relative paths hold
        framed.write_text(html.read_text().replace("</body>", PAIRS_FIRST + "</body>"))
        try:
            raw = screenshot(framed, Path(scratch) / "raw.png")
        finally:
            framed.unlink()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        Image.open(raw).convert("RGB").quantize(colors=256).save(args.out, optimize=True)
    print(f"{args.out} ({args.out.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
