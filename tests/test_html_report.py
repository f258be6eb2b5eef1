"""report.html: self-contained, complete, and rendered by a real browser (headless Chromium)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from distributed import Client, LocalCluster

from equiqc.workflows.cluster import ClusterHandle
from equiqc.workflows.config import RunConfig
from equiqc.workflows.demo import LABEL_NAMES, build_demo_cohort
from equiqc.workflows.run import run_cohort

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--virtual-time-budget=10000"]


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs Debian's chromium package")
        pytest.skip("chromium not installed (apt-get install chromium)")
    return exe


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("html")
    cohort = build_demo_cohort(base, pairs=3, seed=2, failure_fraction=0.34)
    with open(cohort.manifest, "a") as fh:  # one pair that fails, to show its reason
        fh.write("sub-999,missing.nii.gz,atlas.nii.gz,sub-999_to_atlas,,,\n")  # canonical column order
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=":0")
    handle = ClusterHandle(Client(cluster), cluster, False)
    try:
        summary = run_cohort(cohort.manifest, base / "out", RunConfig(samples=3, label_names=LABEL_NAMES), handle)
    finally:
        handle.close()
    assert summary.html == base / "out" / "report.html"
    return base / "out"


@pytest.mark.slow
def test_report_html_is_self_contained_and_complete(run_dir):
    page = (run_dir / "report.html").read_text()
    assert "<table id=\"pairs\">" in page and page.count("<tr class=") == 4
    assert "missing.nii.gz: file not found" in page  # failed pair with its reason
    assert "data:image/png;base64," in page and "src='http" not in page and 'src="http' not in page
    assert "uncertainty vs true error" in page and "std_mm (mm)" not in page[:200]
    for name in ("csf", "gm", "wm"):
        assert f"<td>{name}</td>" in page  # per-structure mean uncertainty


@pytest.mark.slow
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    exe = chromium()
    url = (run_dir / "report.html").as_uri()
    profile = ["--user-data-dir=" + str(tmp_path / "profile")]
    dom = subprocess.run([exe, *CHROMIUM_FLAGS, *profile, "--dump-dom", url], capture_output=True, text=True,
                         timeout=120).stdout
    decoded = re.search(r'data-images-decoded="(\d+)/(\d+)"', dom)
    assert decoded, "the page's load handler did not run"
    ok, total = map(int, decoded.groups())
    assert total >= 3 and ok == total, f"{ok}/{total} images decoded"
    assert "<table id=\"pairs\">" in dom
    shot = tmp_path / "report.png"
    subprocess.run([exe, *CHROMIUM_FLAGS, *profile, "--window-size=1280,2400", f"--screenshot={shot}", url],
                   capture_output=True, timeout=120)
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

    def evaluate(self, session: str, expression: str):
        result = self.send("Runtime.evaluate", session, expression=expression, returnByValue=True)
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
        target = tools.send("Target.createTarget", url=page)["targetId"]
        session = tools.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        deadline = time.time() + 60
        ready = "document.readyState === 'complete' && document.getElementById('rater') !== null"
        while not tools.evaluate(session, ready) and time.time() < deadline:  # a new tab starts as about:blank
            time.sleep(0.2)
        pair = "sub-001_to_atlas"
        tsv = tools.evaluate(session, f"""(() => {{
            document.getElementById('rater').value = 'jd';
            const tr = [...document.querySelectorAll('#pairs tbody tr')].find(r => r.dataset.pair === '{pair}');
            const s = tr.querySelector('select.rating');
            s.value = 'exclude'; s.dispatchEvent(new Event('change'));
            tr.querySelector('input.note').value = 'misaligned frontal lobe';
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
    assert "<option value='exclude' selected>" in (run_dir / "report.html").read_text()  # the stored rating shows


@pytest.mark.slow
def test_the_number_of_embedded_figures_is_capped(run_dir):
    from equiqc.workflows.html_report import write_html_report

    try:
        page = write_html_report(run_dir, max_figures=1).read_text()
        assert page.count("slices' src='data:image/png") == 1
        assert "more pairs to look at are not drawn (at most 1 figures" in page
    finally:
        write_html_report(run_dir)  # the other tests read the full page
