"""report.html: self-contained, complete, and rendered by a real browser (headless Chromium)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

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
    cohort = build_demo_cohort(base, pairs=5, seed=2, failure_fraction=0.2)
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
    assert "<table id=\"pairs\">" in page and page.count("<tr class=") == 6
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
