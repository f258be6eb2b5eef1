"""Headless Chromium for the tests: how it is started comes from docs/screenshot_report.py (the one place that knows
the flags these machines need), and the policy: skipped where Chromium is not installed, a failure in CI (where
.ci/run installs it)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "screenshot_report", Path(__file__).resolve().parents[1] / "docs" / "screenshot_report.py")
screenshot_report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(screenshot_report)
CHROMIUM_FLAGS = screenshot_report.CHROMIUM_FLAGS


def chromium() -> str:
    exe = screenshot_report.chromium_path()
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs Debian's chromium package")
        pytest.skip("chromium not installed (apt-get install chromium)")
    return exe
