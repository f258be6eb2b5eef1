"""The calibration: spread (mm) -> expected error (mm) and a jackknife+ upper bound; its files; its choice by a run;
``equiqc calibrate`` end to end."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
from cohorts import NEAR_FREE_MODEL, TESTS, tiny_cohort
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy.ndimage import gaussian_filter

from equiqc.pipeline.calibration import (
    FEATURES,
    Calibration,
    FeatureCalibration,
    apply_calibration,
    calibration_from_dict,
    coverage_interval,
    feature_matrix,
    fit_calibration,
    fit_feature_calibration,
    leave_one_family_out,
    minimum_pairs,
)
from equiqc.storage.calibration import (
    CalibrationError,
    read_calibration,
    shipped_calibration_path,
    write_calibration,
)
from equiqc.storage.nifti import save_volume
from equiqc.storage.results import complete_pairs, read_array
from equiqc.workflows.calibration_choice import choose_calibration
from equiqc.workflows.cli import main
from equiqc.workflows.config import ConfigError, RunConfig, make_config
from equiqc.workflows.pair_figures import pair_figure
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


def families(rng, n_per_family=15, shifts=(0.0, 0.4, 0.8, 1.2), noise=0.25):
    """Feature matrices of four families whose features sit at different levels (a covariate shift), with a true
    log error ``0.2 + 0.8 x0 + 0.5 x2`` plus Gaussian noise; the other features carry nothing."""
    x, y, g = [], [], []
    for i, shift in enumerate(shifts):
        xi = rng.normal(shift, 0.4, (n_per_family, len(FEATURES)))
        x.append(xi)
        y.append(0.2 + 0.8 * xi[:, 0] + 0.5 * xi[:, 2] + rng.normal(0, noise, n_per_family))
        g += [f"family{i}"] * n_per_family
    return np.concatenate(x), np.exp(np.concatenate(y)), np.array(g)


def test_the_feature_bound_holds_on_a_family_it_was_not_fitted_on():
    rng = np.random.default_rng(0)
    covered = []
    for _ in range(40):
        x, e, g = families(rng)
        held = g == "family3"  # the family furthest from the others: fit on three, measure on the fourth
        cal = fit_feature_calibration(x[~held], e[~held], g[~held], coverage=0.9)
        fresh_x, fresh_e, fresh_g = families(rng, 200)
        sel = fresh_g == "family3"
        covered.append(np.mean(fresh_e[sel] <= cal.predict_features(fresh_x[sel])[1]))
    assert np.mean(covered) >= 0.85
    x, e, g = families(np.random.default_rng(1), 200)
    cal = fit_feature_calibration(x, e, g)
    weights = np.array(cal.weights)
    assert weights[0] == pytest.approx(0.8, abs=0.05) and weights[2] == pytest.approx(0.5, abs=0.05)
    assert (weights >= 0).all() and np.delete(weights, [0, 2]).max() < 0.06


def test_a_feature_never_lowers_the_predicted_error_and_the_range_rule_widens_the_bound():
    rng = np.random.default_rng(2)
    x, e, g = families(rng)
    e = e * np.exp(-0.5 * x[:, 1])  # more of feature 1, less error: the fit keeps its weight at 0, not below
    cal = fit_feature_calibration(x, e, g)
    assert min(cal.weights) >= 0 and cal.weights[1] == 0
    centre = np.median(x, axis=0)
    expected, upper, inside = cal.predict_features(centre[None])
    assert inside[0] and upper[0] > expected[0]
    above = centre.copy()
    above[0] = cal.ranges[0][1] + 5.0  # far above the calibration range: extrapolated, offset doubled
    e_above, u_above, in_above = cal.predict_features(above[None])
    assert not in_above[0]
    assert cal.offset > 0
    assert math.log(u_above[0] / e_above[0]) == pytest.approx(2 * cal.offset - math.log(cal.smearing), rel=1e-9)
    negative = dataclasses.replace(cal, offset=-0.2)  # a fit that over-predicted every family: raised to 0
    e_neg, u_neg, _ = negative.predict_features(above[None])
    assert u_neg[0] == pytest.approx(max(e_neg[0] / cal.smearing, e_neg[0]))
    below = centre.copy()
    below[0] = cal.ranges[0][0] - 5.0  # below it: raised to the minimum, so the bound never falls under it
    at_min = centre.copy()
    at_min[0] = cal.ranges[0][0]
    assert not cal.predict_features(below[None])[2][0]
    assert cal.predict_features(below[None])[0][0] == pytest.approx(cal.predict_features(at_min[None])[0][0])
    missing = centre.copy()
    missing[3] = np.nan
    got = cal.predict_features(missing[None])
    assert np.isnan(got[0][0]) and np.isnan(got[1][0]) and not got[2][0]


def test_leave_one_family_out_reports_every_family_and_refuses_one_family():
    x, e, g = families(np.random.default_rng(3))
    lofo = leave_one_family_out(x, e, g)
    assert set(lofo) == set(g) and all(v["n"] == 15 and 0 <= v["covered"] <= 15 for v in lofo.values())
    with pytest.raises(ValueError, match="at least two"):
        fit_feature_calibration(x, e, np.array(["one"] * len(e)))
    with pytest.raises(ValueError, match="too few"):
        fit_feature_calibration(x[:8], e[:8], g[:8] if len(set(g[:8])) > 1 else np.arange(8) % 2)


def test_feature_calibrations_round_trip_and_older_files_still_apply(tmp_path):
    x, e, g = families(np.random.default_rng(4))
    cal = fit_feature_calibration(x, e, g)
    again = calibration_from_dict(json.loads(json.dumps(cal.to_dict())))
    assert isinstance(again, FeatureCalibration)
    assert np.array_equal(again.predict_features(x)[1], cal.predict_features(x)[1])
    old = calibration_from_dict(fit_calibration(*synthetic(np.random.default_rng(5), 15)).to_dict())
    assert isinstance(old, Calibration)
    rows = [{"status": "complete", "uncertainty_mean_mm": 1.0}, {"status": "complete", "uncertainty_mean_mm": 99.0}]
    apply_calibration(rows, old)
    assert rows[0]["calibration_in_range"] and not rows[1]["calibration_in_range"]
    row = {"status": "complete", **{FEATURES[f][0]: 1.0 for f in FEATURES}}
    assert feature_matrix([row]).shape == (1, len(FEATURES))
    assert apply_calibration([dict(row)], cal)[0]["calibration_in_range"] in (True, False)
    with pytest.raises(ValueError, match="unknown calibration features"):
        calibration_from_dict({**cal.to_dict(), "features": ["made_up", *cal.features[1:]]})


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
    assert main(["calibrate", "--template", str(tmp_path / "template.nii.gz"), "--families", "affine", "bspline",
                 "local", "--pairs-per-family", "5", "--out", str(calib), *options]) == 0
    record = json.loads(calib.read_text())
    assert record["format"] == "equiqc-calibration/2"
    assert record["setting"]["samples"] == 3 and record["setting"]["model"] == NEAR_FREE_MODEL
    assert set(record["cohort"]["families"]) == {"affine", "bspline", "local"}
    assert record["calibration"]["n"] == 15 and len(record["pairs"]) == 15
    assert all(w >= 0 for w in record["calibration"]["weights"])
    lofo = record["leave_one_family_out"]
    assert set(lofo) == {"affine", "bspline", "local"} and all(v["n"] == 5 for v in lofo.values())
    printed = capsys.readouterr().out
    assert all(f"  {family}: {v['covered']}/5" in printed for family, v in lofo.items())
    manifest = tiny_cohort(tmp_path / "cohort", pairs=3)
    out = tmp_path / "out"
    assert main(["run", str(manifest), "--out", str(out), "--calibration", str(calib), *options]) == 0
    decisions = pd.read_csv(out / "decisions.tsv", sep="\t")
    assert (decisions["expected_error_upper_mm"] >= 0).all() and decisions["expected_error_mm"].notna().all()
    assert decisions["calibration_in_range"].isin([True, False]).all()
    # the calibration's voxel model: error_mm stored beside std_mm, exported, and drawn in the pair figures
    assert record["voxel_model"]["features"] == ["log_spread", "mismatch", "log_nonlinear"]
    assert {line["family"] for line in record["voxel_leave_one_family_out"]} == {"affine", "bspline", "local"}
    pair = complete_pairs(out / "results.zarr")[0]
    error, _ = read_array(out / "results.zarr", pair, "error_mm")
    std, _ = read_array(out / "results.zarr", pair, "std_mm")
    assert error.shape == std.shape and np.array_equal(np.isfinite(error), np.isfinite(std))
    assert np.nanmin(error) >= 0
    assert main(["export", str(out), "--all", "--to", str(tmp_path / "exported"), "--arrays", "std_mm,error_mm"]) == 0
    assert (tmp_path / "exported" / f"{pair}_error_mm.nii.gz").is_file()
    with_error = Image.open(io.BytesIO(pair_figure(out / "results.zarr", out / "cohort.zarr", pair)))
    shutil.rmtree(out / "results.zarr" / pair / "error_mm")  # without it the figure loses its fourth row
    without = Image.open(io.BytesIO(pair_figure(out / "results.zarr", out / "cohort.zarr", pair)))
    assert with_error.width == without.width and with_error.height > 1.2 * without.height
    assert "conformal on out-of-family residuals" in (out / "report.html").read_text()
    assert main(["report", str(out)]) == 0  # the rebuilt report applies the same mapping, without the file
    calib.unlink()
    assert main(["report", str(out)]) == 0
    rebuilt = pd.read_csv(out / "decisions.tsv", sep="\t")
    assert np.allclose(rebuilt["expected_error_upper_mm"], decisions["expected_error_upper_mm"])
    run = json.loads((out / "run.json").read_text())
    def with_ranges(lo, hi):  # the run's calibration with every feature's range replaced
        changed = json.loads(json.dumps(run))
        changed["calibration"]["calibration"]["ranges"] = [[lo, hi]] * len(changed["calibration"]["calibration"]
                                                                           ["ranges"])
        (out / "run.json").write_text(json.dumps(changed))
        assert main(["report", str(out)]) == 0
        return pd.read_csv(out / "decisions.tsv", sep="\t")

    wide = with_ranges(-1e3, 1e3)  # every pair inside the range: no note
    assert "lie outside the calibration data" not in (out / "report.html").read_text()
    outside = with_ranges(-1e3, -999.0)  # every pair above it
    assert (wide["calibration_in_range"] == True).all() and (outside["calibration_in_range"] == False).all()  # noqa
    assert np.allclose(outside["expected_error_mm"], wide["expected_error_mm"])  # the same line, extended
    offset = run["calibration"]["calibration"]["offset"]
    assert np.allclose(np.log(outside["expected_error_upper_mm"] / wide["expected_error_upper_mm"]), abs(offset))
    page = (out / "report.html").read_text()
    assert "lie outside the calibration data" in page and "range: widened)" in page  # the summary, each pair
    (out / "run.json").write_text(json.dumps(run))
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


def test_calibrate_refuses_too_few_families_or_pairs_before_any_work(tmp_path):
    from equiqc.workflows.calibrate import calibrate

    config = RunConfig(model=NEAR_FREE_MODEL)
    with pytest.raises(ConfigError, match="give at least three of"):
        calibrate(config, tmp_path / "c.json", tmp_path / "w", families=("affine", "local"))
    with pytest.raises(ConfigError, match="unknown|give at least three"):
        calibrate(config, tmp_path / "c.json", tmp_path / "w", families=("affine", "local", "nope"))
    with pytest.raises(ConfigError, match="--pairs-per-family 2: .* give at least 5"):
        calibrate(config, tmp_path / "c.json", tmp_path / "w", pairs_per_family=2, families=("affine", "local",
                                                                                                 "bspline"))
    assert not (tmp_path / "w").exists()
