"""report.html: complete, its pair figures drawn beside it, and rendered by a real browser (headless Chromium)."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from browser import CHROMIUM_FLAGS, chromium, screenshot_report
from distributed import Client, LocalCluster, get_task_stream
from PIL import Image

from equiqc.workflows.cluster import ClusterHandle
from equiqc.workflows.config import RunConfig
from equiqc.workflows.demo import LABEL_NAMES, build_demo_cohort
from equiqc.workflows.pair_figures import FIGURE_WIDTH, _lut
from equiqc.workflows.run import run_cohort


def table_rows(page: str) -> list[dict]:
    """The pairs table's rows as the page carries them (JSON its script renders a page at a time)."""
    return json.loads(re.search(r'<script id="rows" type="application/json">(.*?)</script>', page, re.S).group(1))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("html")
    cohort = build_demo_cohort(base, pairs=3, seed=2, failure_fraction=0.34)
    with open(cohort.manifest, "a") as fh:  # one pair that fails, to show its reason
        fh.write("sub-999,missing.nii.gz,atlas.nii.gz,sub-999_to_atlas,,,\n")  # canonical column order
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=":0")
    handle = ClusterHandle(Client(cluster), cluster, False)
    try:
        with get_task_stream(handle.client) as stream:
            summary = run_cohort(cohort.manifest, base / "out", RunConfig(samples=3, label_names=LABEL_NAMES), handle)
    finally:
        handle.close()
    assert summary.html == base / "out" / "report.html"
    figures = {t["key"].removeprefix("figure-") for t in stream.data if t["key"].startswith("figure-")}
    (base / "out" / "figure_tasks.json").write_text(json.dumps(sorted(figures)))  # read by the test below
    return base / "out"


@pytest.mark.slow
def test_report_html_is_complete_and_its_figures_are_files(run_dir):
    page = (run_dir / "report.html").read_text()
    rows = table_rows(page)
    assert "<table id=\"pairs\">" in page and len(rows) == 4
    assert "missing.nii.gz: file not found" in page  # failed pair with its reason
    assert "data:image/png;base64," in page and "src='http" not in page and 'src="http' not in page
    assert "uncertainty vs true error" in page and "std_mm (mm)" not in page[:200]
    assert ">true_error_mean_mm</th>" in page and ">transform_deviation_p95_mm</th>" not in page  # no pair has one
    for name in ("csf", "gm", "wm"):
        assert f"<td>{name}</td>" in page  # per-structure mean uncertainty
    shown = json.loads(html.unescape(re.search(r'data-shown="([^"]*)"', page).group(1)))
    assert shown  # the flagged and highest-risk pairs, each drawn once into figures/ and loaded lazily
    assert set(shown) == set(json.loads((run_dir / "figure_tasks.json").read_text()))  # drawn on the workers
    for pid in shown:
        figure = run_dir / "figures" / f"{pid}.png"
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        pixels = np.asarray(Image.open(figure).convert("RGB")).astype(np.int64)
        height = round(800 * pixels.shape[0] / pixels.shape[1])
        assert pixels.shape[1] == FIGURE_WIDTH
        assert f"loading='lazy' width='800' height='{height}' src='figures/{pid}.png'" in page  # its own aspect
        # the std_mm row (the bottom third) in magma, the anatomy rows above it in gray only
        code = (pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2]
        magma = _lut("magma")[:, :3].astype(np.int64)
        in_magma = np.isin(code, (magma[:, 0] << 16) | (magma[:, 1] << 8) | magma[:, 2])
        third = pixels.shape[0] // 3
        assert in_magma[2 * third:].sum() > 5000 and in_magma[:2 * third].sum() < 50
        row = next(r for r in rows if r["p"] == pid)
        assert f"<td><a href='#pair-{pid}'>{pid}</a></td>" in row["t"]  # its table row links to the figure


@pytest.mark.slow
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    exe = chromium()
    url = (run_dir / "report.html").as_uri()
    tools = DevTools(exe, tmp_path / "profile")
    try:
        session = tools.open(url)
        # every image, the lazy pair figures included once scrolled to, decodes
        decoded = tools.evaluate(session, """Promise.all([...document.images].map(i => {
            i.loading = 'eager'; return i.decode().then(() => i.naturalWidth > 0 ? 1 : 0, () => 0); }))
            .then(r => [r.reduce((a, b) => a + b, 0), r.length])""", await_promise=True)
        assert decoded[1] >= 3 and decoded[0] == decoded[1], f"{decoded[0]}/{decoded[1]} images decoded"
        # the filters: failed pairs only, then a text that matches one pair
        counts = tools.evaluate(session, """(() => {
            const visible = () => document.querySelectorAll('#pairs tbody tr').length;
            document.getElementById('status-filter').value = 'failed'; filterTable(); const failed = visible();
            document.getElementById('status-filter').value = ''; document.getElementById('text-filter').value =
                'sub-001_to'; filterTable(); const text = visible();
            document.getElementById('text-filter').value = ''; filterTable();
            sortTable(0); const first = document.querySelector('#pairs tbody tr').dataset.pair;
            return [failed, text, visible(), document.getElementById('shown').textContent, first];
        })()""")
        assert counts[:4] == [1, 1, 4, "4 of 4 shown"] and counts[4] == "sub-999_to_atlas"  # descending by pair
    finally:
        tools.close()
    shot = screenshot_report.screenshot(run_dir / "report.html", tmp_path / "report.png", 1280, 2400)
    assert shot.exists() and shot.stat().st_size > 20_000
    keep = os.environ.get("EQUIQC_SCREENSHOT_DIR")
    if keep:
        shutil.copy(shot, keep)


class DevTools:
    """Chromium driven through the DevTools protocol over ``--remote-debugging-pipe`` (fds 3 and 4 of the
    browser; JSON messages separated by NUL): standard library only, no driver to install."""

    def __init__(self, exe: str, profile: Path):
        cmd_r, self._cmd_w = os.pipe()
        self._res_r, res_w = os.pipe()

        def wire():  # in the child: commands on fd 3, replies on fd 4
            os.dup2(cmd_r, 3)
            os.dup2(res_w, 4)

        flags = [f for f in CHROMIUM_FLAGS if not f.startswith("--virtual-time")]
        self.proc = subprocess.Popen([exe, *flags, f"--user-data-dir={profile}", "--remote-debugging-pipe",
                                      "about:blank"], preexec_fn=wire, pass_fds=(3, 4), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(cmd_r)
        os.close(res_w)
        self._buf, self._id = b"", 0

    def send(self, method: str, session: str | None = None, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + 60
        while time.time() < deadline:
            while b"\0" not in self._buf:
                chunk = os.read(self._res_r, 1 << 16)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(reply["error"])
                return reply["result"]
        raise TimeoutError(method)

    def open(self, url: str) -> str:
        """A new tab showing ``url``, loaded; returns its session id."""
        target = self.send("Target.createTarget", url=url)["targetId"]
        session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        deadline = time.time() + 60
        ready = "document.readyState === 'complete' && document.getElementById('rater') !== null"
        while not self.evaluate(session, ready) and time.time() < deadline:  # a new tab starts as about:blank
            time.sleep(0.2)
        return session

    def evaluate(self, session: str, expression: str, await_promise: bool = False):
        result = self.send("Runtime.evaluate", session, expression=expression, returnByValue=True,
                           awaitPromise=await_promise)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def close(self):
        try:
            self.send("Browser.close")
        except Exception:
            pass
        self.proc.wait(timeout=30)


@pytest.mark.slow
def test_a_reviewer_rates_pairs_in_the_browser_and_the_download_is_merged(run_dir, tmp_path):
    from equiqc.workflows.run import rebuild_report

    exe = chromium()
    page = (run_dir / "report.html").as_uri()
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    tools = DevTools(exe, tmp_path / "profile")
    try:
        tools.send("Browser.setDownloadBehavior", behavior="allow", downloadPath=str(downloads))
        session = tools.open(page)
        deadline = time.time() + 60
        pair = "sub-001_to_atlas"
        tsv = tools.evaluate(session, f"""(() => {{
            document.getElementById('rater').value = 'jd';
            const tr = [...document.querySelectorAll('#pairs tbody tr')].find(r => r.dataset.pair === '{pair}');
            const s = tr.querySelector('select.rating');
            s.value = 'exclude'; s.dispatchEvent(new Event('change', {{bubbles: true}}));  // as a user's choice does
            const n = tr.querySelector('input.note');
            n.value = 'misaligned frontal lobe'; n.dispatchEvent(new Event('input', {{bubbles: true}}));
            sortTable(0); sortTable(0);  // the rating and the note survive the table being drawn again
            return ratingsTSV();
        }})()""")
        assert tsv == f"pair_id\trating\trater\tnote\n{pair}\texclude\tjd\tmisaligned frontal lobe\n"
        tools.evaluate(session, "document.getElementById('download').click()")
        saved = downloads / "ratings.tsv"
        while not saved.exists() and time.time() < deadline:
            time.sleep(0.2)
    finally:
        tools.close()
    assert saved.read_text() == tsv
    rebuild_report(run_dir, ratings=saved)
    excluded = (run_dir / "exclude.tsv").read_text()
    assert pair in excluded and "\texclude" in excluded
    stored = {r["p"]: r["r"] for r in table_rows((run_dir / "report.html").read_text())}
    assert stored[pair] == "exclude"  # the stored rating shows in the table


@pytest.mark.slow
def test_report_rebuilds_draw_only_missing_or_stale_figures(run_dir):
    from equiqc.workflows.html_report import write_html_report

    asked = []

    def draw(out_dir, pair_ids):
        asked.append(list(pair_ids))
        return {pid: None for pid in pair_ids}

    write_html_report(run_dir, draw=draw)
    assert asked == [[]]  # every figure is newer than its result
    shown = json.loads(html.unescape(re.search(r'data-shown="([^"]*)"', (run_dir / "report.html").read_text())[1]))
    result = run_dir / "results.zarr" / shown[0] / "zarr.json"
    older = result.stat().st_mtime_ns - 10**9  # as if the pair was recomputed after its figure was drawn
    os.utime(run_dir / "figures" / f"{shown[0]}.png", ns=(older, older))
    write_html_report(run_dir, draw=draw)
    assert asked[-1] == [shown[0]]
    write_html_report(run_dir)  # drawn again in this process: current once more
    assert asked[-1] == [shown[0]] and (run_dir / "figures" / f"{shown[0]}.png").stat().st_mtime_ns >= \
        result.stat().st_mtime_ns


@pytest.mark.slow
def test_the_number_of_embedded_figures_is_capped(run_dir):
    from equiqc.workflows.html_report import write_html_report

    try:
        page = write_html_report(run_dir, max_figures=1).read_text()
        assert page.count("slices' loading='lazy'") == 1
        assert "more pairs to look at are not drawn (at most 1 figures" in page
    finally:
        write_html_report(run_dir)  # the other tests read the full page
