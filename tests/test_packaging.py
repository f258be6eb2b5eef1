"""The installable distribution: one import package from the built wheel, version, dependencies, console
script, conda environment, layering of packages, CLI start-up time."""

from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys
import time
import tomllib
import zipfile

import pytest
import yaml

import equiqc

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    """The wheel built from this tree (not editable), as `pip install .` would build it."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True, text=True, timeout=300)
    return next(out.glob("equiqc-*.whl"))


@pytest.mark.slow
def test_the_wheel_installs_one_top_level_package_equiqc(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        installed_roots = {line.split(",")[0].split("/")[0] for line in zf.read(record).decode().splitlines()}
        entry_points = zf.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert top_level == {"equiqc"}, top_level
    assert {r for r in installed_roots if not r.endswith(".dist-info")} == {"equiqc"}
    for module in ("equiqc/__init__.py", "equiqc/errors.py", "equiqc/pipeline/estimator.py",
                   "equiqc/pipeline/backends/default_weights.pt", "equiqc/pipeline/backends/calibrations/default.json",
                   "equiqc/storage/results.py",
                   "equiqc/workflows/cli.py"):
        assert module in names, module
    assert not any(n.startswith(("equiqc/tests/", "equiqc/benchmarks/", "equiqc/docs/")) for n in names)
    assert "equiqc = equiqc.workflows.cli:main" in entry_points


@pytest.mark.slow
def test_the_wheel_works_outside_the_source_tree(wheel, tmp_path):
    """Unpacked on its own (no source tree on sys.path): import, version and the CLI."""
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(tmp_path / "site")
    code = ("import equiqc, equiqc.workflows.cli as c; print(equiqc.__version__); print(equiqc.__file__); "
            "c.main(['--version'])")
    # from an empty folder, so the source tree is not importable; the unpacked wheel comes first on sys.path
    out = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(tmp_path / 'site')!r}); "
                          + code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    version, location, cli_version = out.stdout.split("\n")[:3]
    assert location.startswith(str(tmp_path / "site"))
    assert re.fullmatch(r"\d+\.\d+(\.\d+)?(\.dev\d+)?(\+[\w.]+)?", version), version
    assert cli_version == f"equiqc {version}"


def test_version_comes_from_git_metadata():
    assert equiqc.__version__ != "0+unknown"
    assert PROJECT.get("dynamic") == ["version"] and "version" not in PROJECT
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    assert any(r.startswith("setuptools-scm") for r in build)
    # in one fresh process (the wheel test may rewrite the checkout's equiqc.egg-info meanwhile)
    code = "import equiqc, equiqc.workflows.cli as c; print(equiqc.__version__); c.main(['--version'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    version, cli = out.stdout.strip().splitlines()
    assert re.fullmatch(r"\d+\.\d+(\.\d+)?(\.dev\d+)?(\+[\w.]+)?", version) and cli == f"equiqc {version}"


def test_python_bound_is_what_the_code_needs():
    assert PROJECT["requires-python"] == ">=3.11"  # tomllib, zarr 3, datetime.UTC
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    py = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python"))
    assert re.search(r"3\.1[1-9]", py), py


def test_torch_is_a_lower_bound_and_the_cpu_choice_is_in_the_commands():
    torch_req = next(r for r in PROJECT["dependencies"] if r.startswith("torch"))
    assert "==" not in torch_req and ">=" in torch_req
    constraints = (ROOT / ".ci" / "cpu-constraints.txt").read_text()
    assert "torch==" in constraints
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", setup, flags=re.S)
    assert all("-c .ci/cpu-constraints.txt" in c for c in commands)


def test_runtime_dependencies_are_used_by_the_runtime_code():
    """Every runtime dependency is imported somewhere in pipeline/, storage/ or workflows/ (pyarrow, bokeh and
    the dask core are used through pandas / distributed, and are checked by name)."""
    imports = _imports("pipeline") | _imports("storage") | _imports("workflows")
    module_of = {"pyyaml": "yaml", "torch": "torch", "scikit-learn": "sklearn"}
    indirect = {"bokeh", "dask"}  # the dashboard; distributed's core
    for req in PROJECT["dependencies"]:
        name = re.split(r"[<>=\[ ;]", req)[0].lower()
        if name in indirect:
            continue
        assert module_of.get(name, name) in imports, f"{name} is a runtime dependency but no runtime code imports it"


def test_environment_yml_is_conda_native_with_the_extras():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["channels"][0] == "conda-forge"
    conda = {re.split(r"[<>=]", d)[0] for d in env["dependencies"] if isinstance(d, str)}
    for pkg in ("pytorch", "dask", "distributed", "zarr", "nibabel", "xarray", "pandas", "pyarrow", "bokeh",
                "dask-jobqueue"):
        assert pkg in conda, pkg
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert any(p.startswith("-e .[") and "--no-deps" in " ".join(pip_section) for p in pip_section), pip_section


def test_console_script_and_extras():
    extras = PROJECT["optional-dependencies"]
    assert any(re.fullmatch(r"dask-cuda>=26,<27", r) for r in extras["gpu"])
    assert any(r.startswith("dask-jobqueue") for r in extras["cluster"])
    assert PROJECT["scripts"]["equiqc"] == "equiqc.workflows.cli:main"
    out = subprocess.run([sys.executable, "-m", "equiqc.workflows.cli", "--help"], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode == 0 and "estimate" in out.stdout


def test_help_is_fast_and_imports_neither_torch_nor_dask():
    code = ("import sys, time; t = time.perf_counter(); from equiqc.workflows.cli import build_parser; "
            "build_parser(); print(time.perf_counter() - t); "
            "print('torch' in sys.modules, 'distributed' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    seconds, loaded = out.stdout.split("\n")[:2]
    assert loaded == "False False"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "equiqc.workflows.cli", "--help"], capture_output=True, check=True)
    assert time.perf_counter() - start < 2.0  # the interpreter start included; the parser itself is ~0.05 s
    assert float(seconds) < 0.5


def _imports(package: str) -> set[str]:
    names = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] if not a.name.startswith("equiqc.") else a.name.split(".")[1]
                          for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                parts = node.module.split(".")
                names.add(parts[1] if parts[0] == "equiqc" and len(parts) > 1 else parts[0])
    return names


def test_layers_import_one_way_and_only_through_the_namespace():
    assert not _imports("pipeline") & {"storage", "workflows"}
    assert "workflows" not in _imports("storage")
    for folder in ("pipeline", "storage", "workflows", "tests", "benchmarks", "docs"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    assert node.module.split(".")[0] not in {"pipeline", "storage", "workflows"}, (path, node.module)
                if isinstance(node, ast.Import):
                    for alias in node.names:
                        assert alias.name.split(".")[0] not in {"pipeline", "storage", "workflows"}, path


def _module_graph() -> dict[str, set[str]]:
    """``equiqc.*`` module -> the ``equiqc.*`` modules it imports anywhere (top level or inside functions)."""
    modules = {}
    for folder in ("pipeline", "storage", "workflows"):
        for path in (ROOT / folder).rglob("*.py"):
            name = "equiqc." + ".".join(path.relative_to(ROOT).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            found = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
            targets |= {f for f in found if f in modules and f != name}
        graph[name] = targets
    return graph


def test_no_import_cycle_between_modules():
    """Not even through imports inside functions (the run once imported the calibration choice from the calibrate
    command, which imported the run back)."""
    graph, state = _module_graph(), {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != "open", " -> ".join([*path, node, nxt])
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_reading_results_and_ingest_import_no_torch():
    code = ("import sys; import equiqc.storage.results, equiqc.storage.report, equiqc.storage.decisions, "
            "equiqc.storage.cohort, equiqc.storage.transform_files, equiqc.storage.export; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


def test_only_storage_names_the_run_folders_stores_and_record():
    """storage/run_folder.py owns the names: no module outside storage/ spells them (nor reads run.json itself)."""
    names = {"run.json", "results.zarr", "cohort.zarr"}
    for folder in ("pipeline", "workflows"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    assert node.value.strip("/") not in names, (path, node.value)


def test_the_public_api_is_importable_from_the_package_and_lazy():
    code = ("import sys, equiqc; light = 'torch' not in sys.modules and 'distributed' not in sys.modules; "
            "missing = [n for n in equiqc.__all__ if getattr(equiqc, n, None) is None]; print(light, missing)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "True []"
    from equiqc import estimate_uncertainty, open_pair
    from equiqc.pipeline.estimator import estimate_uncertainty as defined
    from equiqc.storage.results import open_pair as opener

    assert estimate_uncertainty is defined and open_pair is opener
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        equiqc.nope  # noqa: B018
