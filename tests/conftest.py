"""Shared fixtures. Test modules import helpers as top-level modules (``anatomy``, ``doubles``): pytest puts
``tests/`` on ``sys.path`` (rootdir-relative "prepend" import mode; ``tests/`` is deliberately not a package,
because the repository root is the ``equiqc`` package itself, see pyproject.toml)."""

from __future__ import annotations

import pytest
from anatomy import moved_template


@pytest.fixture(scope="session")
def mni_pair_2mm():
    return moved_template(2)


@pytest.fixture(scope="session")
def mni_pair_4mm():
    return moved_template(4)
