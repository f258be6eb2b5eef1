"""A bad configuration fails before the cohort runs (schema, model probe, exit codes), declared model
conventions, and provenance in every output (run.json, Parquet metadata, report.html, result keys)."""

from __future__ import annotations

import argparse
import json
import shutil
import time
import urllib.request

import pandas as pd
import pytest
import torch
import torch.nn as nn
import yaml
from cohorts import tiny_cohort
from distributed import Client, LocalCluster

import equiqc
from equiqc.pipeline.backends.conventions import OutputConvention
from equiqc.pipeline.backends.default_net import WEIGHTS
from equiqc.pipeline.numerics import NUMERICS_VERSION
from equiqc.storage.cohort import file_sha256
from equiqc.storage.report import read_metadata
from equiqc.workflows.cli import NO_PAIR_COMPLETED, main
from equiqc.workflows.cluster import ClusterHandle
from equiqc.workflows.config import ConfigError, RunConfig, make_config, options_help
from equiqc.workflows.provenance import probe_model
from equiqc.workflows.run import run_cohort

# ------------------------------------------------------------------------------------- schema, table-driven

BAD_VALUES = [
    ("workers", "8", "option workers: '8' (str) is not allowed; expected an integer or nothing"),
    ("workers", 0, "option workers: 0 is not allowed; it must be >= 1"),
    ("samples", 2.5, "option samples: 2.5 (float)"),
    ("samples", True, "option samples: True (bool)"),
    ("tolerance_mm", "high", "option tolerance_mm: 'high' (str) is not allowed; expected a finite number"),
    ("tolerance_mm", float("nan"), "option tolerance_mm: nan"),
    ("fence_mad", -1, "option fence_mad: -1 is not allowed; it must be >= 0"),
    ("folding_threshold", 2, "option folding_threshold: 2 is not allowed; it must be <= 1"),
    ("cluster", "kubernetes", "option cluster: 'kubernetes' is not allowed; choose one of local, cuda, slurm, pbs"),
    ("perturbation", "warp", "option perturbation: 'warp' is not allowed; choose one of translation"),
    ("overwrite", "yes", "option overwrite: 'yes' (str)"),
    ("model_options", "convention", "option model_options: 'convention' (str)"),
    ("perturbation_options", {"max_rotation": 3}, "unknown key 'max_rotation'"),
    ("perturbation_options", {"max_rotation_deg": "big"}, "max_rotation_deg must be a finite number"),
    ("label_names", {"gm": 1}, "option label_names: key 'gm' is not a label value"),
    ("retries", -1, "option retries: -1 is not allowed"),
]


@pytest.mark.parametrize(("key", "value", "message"), BAD_VALUES)
def test_every_option_is_checked_against_the_schema(tmp_path, key, value, message):
    with pytest.raises(ConfigError) as err:
        RunConfig(**{key: value})
    assert message in str(err.value)
    if isinstance(value, float) and value != value:
        return  # NaN has no YAML spelling that round-trips through safe_dump
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({key: value}))
    with pytest.raises(ConfigError, match=key):
        make_config(tmp_path / "c.yaml")


def test_good_values_pass_and_help_lists_every_user_option():
    RunConfig(workers=None, samples=2, tolerance_mm=3, fence_mad=0.5, label_names={"1": "csf", 2: "gm"},
              perturbation_options={"max_rotation_deg": 2})
    text = options_help()
    assert "workers" in text and "tolerance_mm" in text and "weights_sha256" not in text


def test_a_config_file_cannot_set_internal_keys_or_be_a_list(tmp_path):
    (tmp_path / "c.yaml").write_text("weights_sha256: abc\n")
    with pytest.raises(ConfigError, match="unknown option 'weights_sha256'"):
        make_config(tmp_path / "c.yaml")
    (tmp_path / "old.yaml").write_text("fence-iqr: 1.5\n")  # an option of an older equiqc: named, and what replaced it
    with pytest.raises(ConfigError, match="unknown option 'fence_iqr' \\(replaced by fence_mad"):
        make_config(tmp_path / "old.yaml")
    (tmp_path / "l.yaml").write_text("- samples\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        make_config(tmp_path / "l.yaml")


# ------------------------------------------------------------------------------------- the model probe


def test_probe_loads_the_model_and_hashes_the_shipped_weights():
    info = probe_model(RunConfig())
    assert info.weights_sha256 == file_sha256(WEIGHTS) and not info.stochastic
    assert info.weights_path == str(WEIGHTS.resolve())


@pytest.mark.parametrize(("overrides", "message"), [
    ({"model": "nope"}, "--model nope: the model cannot be loaded (ValueError: unknown model 'nope'"),
    ({"weights": "/no/such/file.pt"}, "--weights /no/such/file.pt: the model cannot be loaded (FileNotFoundError"),
    ({"draws": 2}, "option draws=2 needs a stochastic model"),
    ({"model": "affine-opt", "method": "mc-dropout"}, "affine-opt has no dropout layers"),
    ({"model": "torchscript:/no/such/model.pt"}, "TorchScript model not found"),
    ({"model": "python:no_such_package.mod:make"}, "cannot import"),
])
def test_probe_refuses_a_configuration_the_model_cannot_run(overrides, message):
    with pytest.raises(ConfigError) as err:
        probe_model(RunConfig(**overrides))
    assert message in str(err.value)


class Zeros(nn.Module):
    def forward(self, source, target):
        return torch.cat([source * 0, source * 0, source * 0], dim=1)  # zero displacement


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    path = tmp_path_factory.mktemp("ts") / "zeros.pt"
    torch.jit.save(torch.jit.script(Zeros()), str(path))
    return path


def test_conventions_and_input_shape_are_declared_from_config_files_and_flags(tmp_path, scripted, capsys):
    from equiqc.pipeline.backends.registry import load_backend

    (tmp_path / "c.yaml").write_text(f"model: torchscript:{scripted}\n"
                                     "model_options: {convention: map/normalized/xy, input_shape: [16, 16, 16]}\n")
    cfg = make_config(tmp_path / "c.yaml")
    info = probe_model(cfg)
    assert info.weights_sha256 == file_sha256(scripted)
    backend = load_backend(cfg.model, **cfg.model_options)
    assert backend.convention == OutputConvention("map", "normalized", "xy") and backend.input_shape == (16, 16, 16)
    # flags override the file's model options
    from equiqc.workflows.cli import _config, build_parser

    args = build_parser().parse_args(["run", "m.csv", "--out", "o", "--config", str(tmp_path / "c.yaml"),
                                      "--output-convention", "displacement/voxel/ij", "--input-shape", "8", "8", "8"])
    cfg = _config(args)
    assert cfg.model_options == {"convention": "displacement/voxel/ij", "input_shape": [8, 8, 8]}
    # a bad declaration is one error before any work
    manifest = tmp_path / "m.csv"
    manifest.write_text("subject_id,source,target\ns1,a.nii.gz,b.nii.gz\n")
    for flag, value, word in (("--output-convention", "map/furlongs/xy", "units must be one of"),
                              ("--input-shape", "0", "input_shape")):
        code = main(["run", str(tmp_path / "m.csv"), "--out", str(tmp_path / "o"), "--model",
                     f"torchscript:{scripted}", flag, value])
        err = capsys.readouterr().err
        assert code == 2 and word in err and len(err.strip().splitlines()) == 1, err


# ------------------------------------------------------------------------------------- exit codes, CLI


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory):
    return tiny_cohort(tmp_path_factory.mktemp("cohort"), pairs=2)


@pytest.mark.parametrize(("args", "config", "word"), [
    (["--model", "nope"], None, "nope"),
    (["--weights", "/no/such/w.pt"], None, "/no/such/w.pt"),
    ([], "draws: 2\n", "draws"),
    ([], 'workers: "8"\n', "workers"),
    ([], "tolerance_mm: high\n", "tolerance_mm"),
])
def test_a_bad_configuration_exits_2_at_once_before_any_ingest(small_cohort, tmp_path, capsys, args, config, word):
    if config:
        (tmp_path / "c.yaml").write_text(config)
        args = [*args, "--config", str(tmp_path / "c.yaml")]
    start = time.perf_counter()
    code = main(["run", str(small_cohort), "--out", str(tmp_path / "out"), *args])
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err.strip()
    assert code == 2 and word in err and len(err.splitlines()) == 1, err
    assert seconds < 10
    assert not (tmp_path / "out" / "cohort.zarr").exists() and not (tmp_path / "out" / "run.json").exists()


def test_debug_shows_the_traceback_of_a_user_error(small_cohort, tmp_path, capsys):
    assert main(["--debug", "run", str(small_cohort), "--out", str(tmp_path / "o"), "--model", "x"]) == 2
    assert "Traceback" in capsys.readouterr().err


def local(workers: int = 1) -> ClusterHandle:
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                           dashboard_address="127.0.0.1:0")
    return ClusterHandle(Client(cluster), cluster, False)


@pytest.mark.slow
def test_a_run_in_which_no_pair_completes_exits_3(tmp_path, capsys):
    for name in ("a.nii.gz", "b.nii.gz"):
        (tmp_path / name).write_bytes(b"not a nifti file")
    (tmp_path / "m.csv").write_text("subject_id,source,target\ns1,a.nii.gz,b.nii.gz\ns2,b.nii.gz,a.nii.gz\n")
    code = main(["run", str(tmp_path / "m.csv"), "--out", str(tmp_path / "out"), "--workers", "1", "--samples", "2"])
    captured = capsys.readouterr()
    assert code == NO_PAIR_COMPLETED and "no pair completed (2 failed)" in captured.err
    assert "not a readable NIfTI file" in captured.out


# ------------------------------------------------------------------------------------- provenance, resume


@pytest.mark.slow
def test_provenance_everywhere_and_new_weights_recompute_every_pair(small_cohort, tmp_path, capsys, caplog):
    caplog.set_level("INFO", logger="equiqc")
    weights = tmp_path / "w.pt"
    shutil.copy(WEIGHTS, weights)
    out = tmp_path / "out"
    cfg = make_config(weights=str(weights), samples=2, batch_size=2)
    handle = local(1)
    try:
        first = run_cohort(small_cohort, out, cfg, handle, argv=["equiqc", "run", "test"])
        assert first.computed == 2
        dashboard = urllib.request.urlopen(handle.dashboard.replace("/status", "/status"), timeout=30).read().decode()
        assert "needs bokeh" not in dashboard.lower() and "bokeh" in dashboard.lower()

        run = json.loads((out / "run.json").read_text())
        prov = run["provenance"]
        for key in ("equiqc_version", "equiqc_commit", "torch", "cuda", "devices", "host", "started", "finished",
                    "command_line", "model", "python"):
            assert key in prov, key
        assert prov["equiqc_version"] == equiqc.__version__ and prov["command_line"] == "equiqc run test"
        assert prov["devices"] and prov["devices"][0].startswith("cpu")
        assert prov["model"]["weights_sha256"] == file_sha256(weights) == file_sha256(WEIGHTS)
        assert run["result_key"]["weights_sha256"] == file_sha256(weights)
        assert run["result_key"]["numerics_version"] == NUMERICS_VERSION
        assert prov["started"] <= prov["finished"]
        meta = read_metadata(out / "report.parquet")
        assert meta["provenance"] == prov and meta["config"]["weights"] == str(weights)
        assert read_metadata(out / "subjects.parquet")["provenance"]["host"] == prov["host"]
        html = (out / "report.html").read_text()
        assert equiqc.__version__ in html and file_sha256(weights)[:16] in html

        # same configuration, same weights: resume computes nothing
        assert run_cohort(small_cohort, out, cfg, handle).computed == 0
        # replace the weights file at the same path: every pair is stale and recomputed, never mixed
        state = torch.load(weights, weights_only=True)
        name = next(k for k, v in state["model"].items() if v.is_floating_point())
        state["model"][name] = state["model"][name] + 0.01
        torch.save(state, weights)
        again = run_cohort(small_cohort, out, cfg, handle)
        assert again.computed == 2
        assert "every pair is recomputed" in caplog.text
        assert json.loads((out / "run.json").read_text())["result_key"]["weights_sha256"] == file_sha256(weights)
        report = pd.read_parquet(out / "report.parquet")
        assert (report["status"] == "complete").all()
    finally:
        handle.close()
    # export of a pair that is not there: one line naming the pairs that are
    capsys.readouterr()
    code = main(["export", str(out), "--pair", "typo", "--to", str(tmp_path / "nii")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "pair 'typo' has no results" in err and "sub-001_sub-001_to_atlas" in err
    assert len(err.splitlines()) == 1
    code = main(["export", str(out), "--pair", "sub-001_sub-001_to_atlas", "--to", str(tmp_path / "nii"),
                 "--arrays", "nope"])
    assert code == 2 and "no array 'nope'; stored arrays:" in capsys.readouterr().err


def test_a_numerics_change_makes_stored_results_stale_not_mismatched():
    from equiqc.storage.results import RECOMPUTE_KEYS, differing_keys

    key = RunConfig().result_key()
    bumped = {**key, "numerics_version": key["numerics_version"] + 1}
    assert differing_keys(key, bumped) <= RECOMPUTE_KEYS
    assert not differing_keys(key, {**key, "samples": 3}) <= RECOMPUTE_KEYS


@pytest.mark.slow
def test_failed_pairs_leave_crash_files_and_the_run_a_log(tmp_path, monkeypatch, capsys):
    from cohorts import TESTS

    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    manifest = tiny_cohort(tmp_path / "c", pairs=3, unreadable=(2,))
    out = tmp_path / "out"
    code = main(["run", str(manifest), "--out", str(out), "--model", "python:doubles:Exploding", "--samples", "2",
                 "--workers", "1"])
    err = capsys.readouterr().err
    assert code == NO_PAIR_COMPLETED
    report = pd.read_parquet(out / "report.parquet").set_index("pair_id")
    crash = out / report.loc["sub-000_sub-000_to_atlas", "crash_file"]
    text = crash.read_text()
    assert "Traceback" in text and "the network exploded on purpose" in text  # the full traceback, kept
    refused = (out / report.loc["sub-002_sub-002_to_atlas", "crash_file"]).read_text()
    assert "not a readable NIfTI file" in refused
    log = (out / "equiqc.log").read_text()
    assert "sub-000_sub-000_to_atlas: failed (RuntimeError" in log and "run of 3 pairs" in log
    assert len(err.splitlines()) < 15  # a warning per failed pair and the summary, no line per stage
    assert "crash/sub-000_sub-000_to_atlas.txt" in (out / "report.html").read_text()


def test_an_option_is_declared_once_and_reaches_every_command_and_the_schema(tmp_path):
    """Each flag of a config option comes from its one declaration (workflows/config.py): every command of its
    group has it with the declared type, choices and no default of its own; the config file takes it;
    ``equiqc options`` lists it; ``equiqc estimate`` and ``equiqc run`` share the defaults."""
    import dataclasses

    from equiqc.workflows.cli import build_parser
    from equiqc.workflows.config import (
        ESTIMATE,
        RUN,
        RUN_COMMANDS,
        RunConfig,
        cli_options,
        load_config_file,
        options_help,
    )

    parser = build_parser()
    commands = {name: sub for action in parser._actions if isinstance(action, argparse._SubParsersAction)
                for name, sub in action.choices.items()}
    groups = {RUN: RUN_COMMANDS, ESTIMATE: ("estimate",)}
    declared = {f.name: f for f in dataclasses.fields(RunConfig)}
    for group, names in groups.items():
        options = cli_options(group)
        assert options
        for command in names:
            flags = {a.dest: a for a in commands[command]._actions}
            for name, base, _, meta in options:
                action = flags[name]
                assert action.option_strings == ["--" + name.replace("_", "-")], (command, name)
                assert action.default is None and meta["help"] in action.help, (command, name)
                assert (action.type is base) or (base is bool and action.const is True), (command, name)
                assert action.choices == meta.get("choices"), (command, name)
    for name, *_ in cli_options(RUN) + cli_options(ESTIMATE):
        assert name in options_help() and not declared[name].metadata.get("internal")
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"{name.replace('_', '-')}: null\n")
        assert name in load_config_file(path)
    run = parser.parse_args(["run", "m.csv", "--out", "o"])
    estimate = parser.parse_args(["estimate", "s.nii.gz", "t.nii.gz"])
    assert run.samples is None and estimate.samples is None  # both: the option's (or the model's) default


def test_the_pipelines_dataclasses_own_the_defaults_of_the_options_they_take():
    """RunConfig's K, draws, batch size, perturbation family and decision thresholds are the defaults of
    EstimatorConfig, PerturbationConfig and DecisionRules (no second literal that could drift)."""
    import dataclasses

    from equiqc.pipeline.decision import DecisionRules
    from equiqc.pipeline.estimator_config import EstimatorConfig
    from equiqc.pipeline.perturbation_config import PerturbationConfig

    config = RunConfig()
    shared = 0
    for cls in (EstimatorConfig, DecisionRules):
        for f in dataclasses.fields(cls):
            if hasattr(config, f.name) and f.name != "perturbation":  # RunConfig's is PerturbationConfig's kind
                assert getattr(config, f.name) == f.default, (cls.__name__, f.name)
                shared += 1
    assert shared >= 9
    assert config.perturbation == PerturbationConfig().kind
    assert config.decision_rules() == DecisionRules() and config.estimator_config().samples == EstimatorConfig().samples
    changed = RunConfig(tolerance_mm=2.0, deviation_mm=0.5, samples=4)
    assert changed.decision_rules().tolerance_mm == 2.0 and changed.decision_rules().deviation_mm == 0.5
    assert changed.estimator_config().samples == 4


def test_a_task_uses_the_configuration_built_in_the_client_without_rebuilding_it(tmp_path, monkeypatch):
    """The tasks get one TaskConfig (RunConfig, estimator settings, result key) and never re-validate it: a pair
    computes with validation switched off."""
    from equiqc.storage.manifest import read_manifest
    from equiqc.workflows import config as config_module
    from equiqc.workflows.tasks import TaskConfig, pairs_task

    manifest = tiny_cohort(tmp_path / "c", pairs=1)
    task = TaskConfig.of(RunConfig(samples=2))

    def no_rebuild(config):
        raise AssertionError("a task rebuilt its configuration")

    monkeypatch.setattr(config_module, "validate", no_rebuild)
    rows = pairs_task(read_manifest(manifest), str(tmp_path / "cohort.zarr"), str(tmp_path / "results.zarr"), task)
    assert [r["status"] for r in rows] == ["complete"] and rows[0]["n_samples"] == 2


def test_the_model_registry_and_its_defaults_load_without_torch():
    import subprocess
    import sys

    code = ("import sys; from equiqc.pipeline.backends.registry import model_atlas, model_defaults; "
            "import equiqc.workflows.config; "
            "print('torch' in sys.modules, dict(model_defaults('ants')), model_atlas('multipropreg'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False {'perturbation': 'rigid', 'samples': 8} multipropreg"
