"""The calibration: spread (mm) -> expected error (mm) and a jackknife+ upper bound; its files; its choice by a run;
``equiqc calibrate`` end to end."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest
from cohorts import NEAR_FREE_MODEL, TESTS, tiny_cohort
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.ndimage import gaussian_filter

from equiqc.pipeline.calibration import (
    Calibration,
    apply_calibration,
    coverage_interval,
    fit_calibration,
    minimum_pairs,
)
from equiqc.storage.calibration import (
    CalibrationError,
    read_calibration,
    shipped_calibration_path,
    write_calibration,
)
from equiqc.storage.nifti import save_volume
from equiqc.workflows.calibration_choice import choose_calibration
from equiqc.workflows.cli import main
from equiqc.workflows.config import ConfigError, RunConfig, make_config
from equiqc.workflows.provenance import probe_model


def synthetic(rng, n, slope=0.8, scale=1.5, noise=0.3):
    """Pairs whose true mean error is ``scale * spread^slope`` times log-normal noise (mm)."""
    spread = rng.uniform(0.2, 5.0, n)
    return spread, scale * spread ** slope * np.exp(rng.normal(0, noise, n))


def test_the_upper_bound_covers_at_its_stated_rate_on_exchangeable_pairs():
    rng = np.random.default_rng(0)
    coverages = []
    for _ in range(60):  # the jackknife+ coverage is marginal: average it over calibration cohorts
        calibration = fit_calibration(*synthetic(rng, 30), coverage=0.9)
        spread, error = synthetic(rng, 500)
        coverages.append(np.mean(error <= calibration.predict(spread)[1]))
    assert 0.87 <= np.mean(coverages) <= 0.95
    assert np.mean(coverages) >= 0.9 - 0.03  # not below the stated rate beyond sampling error


def test_the_fit_recovers_a_known_law_and_the_expected_value_is_a_mean():
    rng = np.random.default_rng(1)
    spread, error = synthetic(rng, 4000, noise=0.4)
    calibration = fit_calibration(spread, error, floor_mm=1e-9)
    assert calibration.slope == pytest.approx(0.8, abs=0.03)
    test_spread, test_error = synthetic(rng, 20000, noise=0.4)
    expected, _ = calibration.predict(test_spread)
    assert np.mean(expected) == pytest.approx(np.mean(test_error), rel=0.03)  # smearing: a mean, not a median


def test_too_few_pairs_and_a_negative_relation():
    assert minimum_pairs(0.9) == 9 and minimum_pairs(0.8) == 4
    with pytest.raises(ValueError, match="needs at least 9"):
        fit_calibration(np.arange(1, 9.0), np.arange(1, 9.0), coverage=0.9)
    with pytest.raises(ValueError, match="coverage"):
        fit_calibration(np.arange(1, 20.0), np.arange(1, 20.0), coverage=1.0)
    falling = fit_calibration(np.arange(1, 13.0), 13 - np.arange(1, 13.0))
    assert falling.slope == 0  # more spread never predicts less error
    spread_nan = falling.predict([np.nan, 1.0])
    assert math.isnan(spread_nan[0][0]) and math.isnan(spread_nan[1][0]) and math.isfinite(spread_nan[1][1])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 20), st.floats(0.01, 50)), min_size=9, max_size=30),
       st.lists(st.floats(0, 100), min_size=2, max_size=10))
def test_predictions_are_finite_positive_and_never_fall_with_the_spread(pairs, spreads):
    calibration = fit_calibration([p[0] for p in pairs], [p[1] for p in pairs])
    spreads = np.sort(np.array(spreads))
    expected, upper = calibration.predict(spreads)
    assert np.isfinite(expected).all() and np.isfinite(upper).all() and (expected > 0).all()
    assert (np.diff(expected) >= -1e-9 * expected[1:]).all() and (np.diff(upper) >= -1e-9 * upper[1:]).all()


def test_clopper_pearson_interval_and_rows():
    low, high = coverage_interval(9, 10)
    assert low == pytest.approx(0.5550, abs=1e-3) and high == pytest.approx(0.9975, abs=1e-3)
    calibration = fit_calibration(*synthetic(np.random.default_rng(2), 20))
    rows = apply_calibration([{"status": "complete", "uncertainty_mean_mm": 1.0},
                              {"status": "complete", "uncertainty_mean_mm": None},
                              {"status": "failed"}], calibration)
    assert math.isfinite(rows[0]["expected_error_upper_mm"]) and math.isnan(rows[1]["expected_error_mm"])
    assert "expected_error_mm" not in rows[2]
    assert math.isnan(apply_calibration([{"status": "complete", "uncertainty_mean_mm": 1.0}], None)[0][
        "expected_error_upper_mm"])


def test_calibration_files_round_trip_and_bad_files_are_named(tmp_path):
    calibration = fit_calibration(*synthetic(np.random.default_rng(3), 15))
    path = write_calibration(tmp_path / "c.json", {"setting": {"model": "m"}, "calibration": calibration.to_dict()})
    again = Calibration.from_dict(read_calibration(path)["calibration"])
    assert np.array_equal(again.predict([0.5, 3.0])[1], calibration.predict([0.5, 3.0])[1])
    with pytest.raises(CalibrationError, match="not found.*equiqc calibrate"):
        read_calibration(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(CalibrationError, match="bad.json: not a readable JSON file"):
        read_calibration(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"a": 1}')
    with pytest.raises(CalibrationError, match="not an equiqc calibration"):
        read_calibration(tmp_path / "other.json")


def _probed(**options) -> RunConfig:
    config = RunConfig(**options)
    return dataclasses.replace(config, weights_sha256=probe_model(config).weights_sha256)


def test_a_run_uses_the_shipped_calibration_only_for_its_setting(tmp_path):
    default = choose_calibration(_probed())
    assert default.calibration is not None and default.source == "shipped:default"
    assert "90% upper bound" in default.summary
    other_k = choose_calibration(_probed(samples=8))
    assert other_k.calibration is None and "differs in: samples" in other_k.summary
    assert choose_calibration(_probed(calibration="none")).calibration is None
    third_party = make_config(model="multipropreg")  # its defaults (diffeomorphic, K = 16), as `equiqc run` gets them
    mpr = choose_calibration(dataclasses.replace(third_party, weights_sha256=probe_model(third_party).weights_sha256))
    assert mpr.calibration is not None and mpr.source == "shipped:multipropreg"
    ants = choose_calibration(make_config(model="ants"))  # its defaults (rigid, K = 8); no weights to hash
    assert ants.calibration is not None and ants.source == "shipped:ants"
    assert choose_calibration(make_config(model="ants", samples=16)).calibration is None
    unknown = choose_calibration(_probed(model="affine-opt"))
    assert unknown.calibration is None and "no calibration ships for model 'affine-opt'" in unknown.summary
    record = read_calibration(shipped_calibration_path("default"))
    write_calibration(tmp_path / "k8.json", {**record, "setting": {**record["setting"], "samples": 4}})
    with pytest.raises(ConfigError, match=r"k8.json: made for another setting \(differs in: samples\)"):
        choose_calibration(_probed(calibration=str(tmp_path / "k8.json")))


@pytest.mark.slow
def test_calibrate_end_to_end_then_a_run_with_its_calibration(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    rng = np.random.default_rng(0)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    template = gaussian_filter(rng.random((22, 24, 20)), 2).astype(np.float32)
    save_volume(tmp_path / "template.nii.gz", template, affine)
    options = ["--model", NEAR_FREE_MODEL, "--samples", "3", "--batch-size", "3", "--workers", "2"]
    calib = tmp_path / "calib.json"
    assert main(["calibrate", "--template", str(tmp_path / "template.nii.gz"), "--pairs", "12", "--held-out",
                 "0.25", "--out", str(calib), *options]) == 0
    record = json.loads(calib.read_text())
    assert record["setting"]["samples"] == 3 and record["setting"]["model"] == NEAR_FREE_MODEL
    assert record["held_out"]["n"] == 3 and len(record["fit_pairs"]) == 9
    assert len(record["calibration"]["loo"]) == 9
    assert f"held-out coverage {record['held_out']['covered']}/3" in capsys.readouterr().out
    manifest = tiny_cohort(tmp_path / "cohort", pairs=3)
    out = tmp_path / "out"
    assert main(["run", str(manifest), "--out", str(out), "--calibration", str(calib), *options]) == 0
    decisions = pd.read_csv(out / "decisions.tsv", sep="\t")
    assert (decisions["expected_error_upper_mm"] >= 0).all() and decisions["expected_error_mm"].notna().all()
    assert "jackknife+" in (out / "report.html").read_text()
    assert main(["report", str(out)]) == 0  # the rebuilt report applies the same mapping, without the file
    calib.unlink()
    assert main(["report", str(out)]) == 0
    rebuilt = pd.read_csv(out / "decisions.tsv", sep="\t")
    assert np.allclose(rebuilt["expected_error_upper_mm"], decisions["expected_error_upper_mm"])
    run = json.loads((out / "run.json").read_text())
    del run["calibration"], run["config"]["calibration"]  # a folder from before calibrations: the report chooses
    # now, and none ships for this model
    (out / "run.json").write_text(json.dumps(run))
    assert main(["report", str(out)]) == 0
    assert pd.read_csv(out / "decisions.tsv", sep="\t")["expected_error_mm"].isna().all()
    assert "no calibration ships for model" in (out / "report.html").read_text()
    # another setting than the calibration's: refused before any work
    (tmp_path / "c2.json").write_text(json.dumps(record))
    assert main(["run", str(manifest), "--out", str(tmp_path / "o2"), "--calibration", str(tmp_path / "c2.json"),
                 *options[:2], "--samples", "4"]) == 2
    assert "differs in: samples" in capsys.readouterr().err and not (tmp_path / "o2").exists()
