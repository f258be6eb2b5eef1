"""The documentation site builds with warnings as errors, and its generated references cover every command,
flag and option; the screenshot script takes a real picture of a real report."""

from __future__ import annotations

import argparse
import html
import re
import subprocess
import sys
from pathlib import Path

import pytest
from browser import chromium, screenshot_report
from PIL import Image

from equiqc.workflows.cli import build_parser
from equiqc.workflows.config import option_rows

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return {name: sub for action in parser._actions if isinstance(action, argparse._SubParsersAction)
            for name, sub in action.choices.items()}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-b", "html",
                           str(DOCS), str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def text_of(page: Path) -> str:
    return html.unescape(re.sub(r"<[^>]+>", " ", page.read_text()))


def test_the_site_builds_with_warnings_as_errors_and_has_every_page(site):
    pages = {p.relative_to(DOCS).with_suffix("") for p in DOCS.rglob("*.md") if "_build" not in p.parts}
    for page in pages:
        assert (site / page.with_suffix(".html")).is_file(), page
    assert (site / "_static" / "report.png").is_file()


def test_the_cli_reference_documents_every_flag_of_every_command(site):
    raw = (site / "cli.html").read_text()
    page = text_of(site / "cli.html")
    for name, sub in commands(build_parser()).items():
        assert f'id="equiqc-{name}"' in raw, name  # the command's section
        for action in sub._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert flag in page, (name, flag)
                    if action.help:
                        assert " ".join(action.help.split()[:4]) in " ".join(page.split()), (name, flag)


def test_the_options_reference_documents_every_option_as_declared(site):
    page = " ".join(text_of(site / "options.html").split())
    for row in option_rows():
        assert row["name"] in page and " ".join(row["help"].split()) in page, row["name"]
        if row["flag"]:
            assert row["flag"] in page


def test_the_api_reference_documents_the_public_api(site):
    import equiqc

    page = (site / "api.html").read_text()
    for name in equiqc.__all__:
        if name != "__version__":
            assert f'id="equiqc.{name}"' in page, name  # autodoc's entry (its anchor) for each public name


@pytest.mark.slow
def test_the_screenshot_is_taken_from_a_real_demo_run(tmp_path):
    chromium()
    out = tmp_path / "report.png"
    assert screenshot_report.main(["--out", str(out), "--pairs", "4", "--samples", "2"]) == 0
    picture = Image.open(out)
    assert picture.size == (1280, 1000)
    colours = picture.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is not None and len(colours) > 20  # a rendered page, not a blank one
