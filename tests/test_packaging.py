"""The installable distribution: metadata, console script, conda environment, layering of packages."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import tomllib
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_environment_yml_installs_the_project_with_the_same_torch_pin():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    torch_pin = next(r for r in project["dependencies"] if r.startswith("torch"))
    assert torch_pin in pip_section
    assert "-e .[test]" in pip_section
    py = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    assert tuple(map(int, py.split("=")[1].split("."))) >= (3, 10)


def test_extras_and_console_script():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert any(r.startswith("dask-cuda>=26") for r in extras["gpu"])
    assert any(r.startswith("dask-jobqueue") for r in extras["cluster"])
    assert project["scripts"]["equiqc"] == "workflows.cli:main"
    out = subprocess.run([sys.executable, "-m", "workflows.cli", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "estimate" in out.stdout


def _imports(package: str) -> set[str]:
    names = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def test_layers_import_one_way():
    assert not _imports("pipeline") & {"storage", "workflows"}
    assert "workflows" not in _imports("storage")
