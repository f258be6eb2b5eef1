"""Sphinx configuration of equiqc's documentation site.

Build it (the extra ``equiqc[docs]`` installs what it needs) with warnings as errors, as CI does::

    sphinx-build -W --keep-going -b html docs docs/_build/html

Pages are Markdown (MyST). Three parts are generated from the code at build time, so they cannot go stale: the
command-line reference (sphinx-argparse, from :func:`equiqc.workflows.cli.build_parser`), the config-file options
(the ``equiqc-options`` directive below, from :class:`equiqc.workflows.config.RunConfig`'s declaration) and the
API reference (autodoc, from the docstrings of the public API).
"""

from __future__ import annotations

from docutils import nodes
from sphinx.util.docutils import SphinxDirective

import equiqc

project = "equiqc"
author = "the equiqc developers"
copyright = "2026, the equiqc developers"  # noqa: A001 (Sphinx's name)
release = equiqc.__version__
version = release

extensions = ["myst_parser", "sphinxarg.ext", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
# Data files, images and scripts beside the pages are not pages.
exclude_patterns = ["_build", "validation/*.json", "performance", "models/ants", "examples", "**/*.py"]
myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
smartquotes = False  # option names, help texts and file names stay as typed (no curly quotes, no ellipsis sign)
myst_heading_anchors = 3  # [text](#a-heading) links within and across pages

html_theme = "furo"
html_title = f"equiqc {release}"
html_static_path = ["_static"]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "undoc-members": False}
napoleon_google_docstring = True  # "Attributes:" sections
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # attributes as fields of their class (autodoc documents the members too)


class OptionsList(SphinxDirective):
    """``equiqc-options``: every config-file option (name, flag and the commands that take it, meaning, type,
    default, allowed values), from :class:`~equiqc.workflows.config.RunConfig`'s declaration. Built as docutils
    nodes, not parsed, so that no help text is read as markup."""

    def run(self) -> list[nodes.Node]:
        from equiqc.workflows.config import option_rows

        listing = nodes.definition_list(classes=["equiqc-options"])
        for row in option_rows():
            term = nodes.term()
            term += nodes.literal(text=row["name"])
            if row["flag"]:
                term += nodes.Text("  ·  ")
                term += nodes.literal(text=row["flag"])
            definition = nodes.definition()
            definition += nodes.paragraph(text=row["help"])
            facts = nodes.paragraph()
            facts += nodes.emphasis(text=row["type"])
            facts += nodes.Text("; default ")
            facts += nodes.Text(row["default"]) if row["default_is_prose"] else nodes.literal(text=row["default"])
            if row["allowed"]:
                facts += nodes.Text("; allowed: ")
                facts += nodes.literal(text=row["allowed"])
            facts += nodes.Text(f"; flag of: {row['commands']}" if row["flag"] else "; config file only")
            definition += facts
            item = nodes.definition_list_item()
            item += term
            item += definition
            listing += item
        return [listing]


def setup(app):
    app.add_directive("equiqc-options", OptionsList)
