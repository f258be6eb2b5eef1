"""The cohort decision and its statistics, table-driven: empty regions, NaN, constant cohorts, a cohort of one,
zero medians, ties; plus the decision files, ratings and re-thresholding end to end."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from cohorts import NEAR_FREE_MODEL, TESTS, tiny_cohort
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from equiqc.pipeline import transforms as T
from equiqc.pipeline.decision import REASONS, RISK_BOUND, DecisionRules, average_ranks, decide
from equiqc.pipeline.estimator import UncertaintyResult
from equiqc.pipeline.scores import SUMMARY_KEYS, auroc, pair_summary, sparsification_naurc, spearman
from equiqc.storage.decisions import RatingsError, read_ratings, session_of
from equiqc.workflows.cli import main


def row(pid, mean=1.0, p95=2.0, fold=0.0, n=1000, status="complete", **extra):
    return {"pair_id": pid, "subject_id": pid, "status": status, "uncertainty_mean_mm": mean,
            "uncertainty_p95_mm": p95, "folding_fraction": fold, "n_region_voxels": n, **extra}


def normal(k, p95=2.0):
    return [row(f"p{i}", p95=p95 + 0.01 * i) for i in range(k)]


CASES = [
    # name, rows, rules, expected reasons per pair id (missing id: no reasons)
    ("empty region is flagged, not passed", [*normal(6), row("e", mean=np.nan, p95=np.nan, fold=np.nan, n=0)],
     DecisionRules(), {"e": ["empty_region"]}),
    ("NaN metric with a non-empty region", [*normal(6), row("x", mean=np.nan)], DecisionRules(), {"x": ["failed"]}),
    ("missing metric is not 'not flagged'", [*normal(6), {"pair_id": "m", "subject_id": "m", "status": "complete",
                                                          "n_region_voxels": 10}], DecisionRules(), {"m": ["failed"]}),
    ("failed pair", [*normal(3), row("f", status="failed")], DecisionRules(), {"f": ["failed"]}),
    ("constant cohort: nobody is an outlier", [row(f"c{i}") for i in range(10)], DecisionRules(), {}),
    ("zero median (a clean cohort)", [row(f"z{i}", mean=0.0, p95=0.0) for i in range(10)], DecisionRules(), {}),
    ("cohort of one", [row("only")], DecisionRules(), {}),
    ("a large spread is an outlier", [*normal(10), row("big", p95=30.0)], DecisionRules(), {"big": ["outlier"]}),
    ("tiny differences under the noise floor are not outliers", [*[row(f"t{i}", p95=1e-6 * i) for i in range(10)],
                                                                 row("t_big", p95=2e-5)], DecisionRules(), {}),
    ("over the tolerance by the spread alone", [*normal(6), row("u", mean=5.0, p95=2.05)], DecisionRules(3.0),
     {"u": ["uncertainty"]}),
    ("a calibrated upper bound decides when present", [*normal(6), row("cal", mean=1.0, expected_error_upper_mm=4.0)],
     DecisionRules(3.0), {"cal": ["uncertainty"]}),
    ("a low calibrated bound does not hide a spread over the tolerance",
     [*normal(6), row("low", mean=5.0, p95=2.05, expected_error_upper_mm=1.0)], DecisionRules(3.0),
     {"low": ["uncertainty"]}),
    ("a calibrated bound under the tolerance passes", [*normal(6), row("ok", mean=1.0, expected_error_upper_mm=2.5)],
     DecisionRules(3.0), {}),
    ("folding", [*normal(6), row("fold", fold=0.05)], DecisionRules(), {"fold": ["folding"]}),
    ("ties do not flag", [*[row(f"tie{i}", p95=2.0) for i in range(5)], *[row(f"tie2{i}", p95=2.2) for i in range(5)]],
     DecisionRules(), {}),
    # a given transform: flagged when its p95 distance from the ensemble mean is above deviation_mm AND above three
    # times the pair's own p95 spread (p95 = 2.0 here: 6 mm)
    ("a given transform far from the ensemble", [*normal(6), row("far", transform_deviation_p95_mm=6.5)],
     DecisionRules(deviation_mm=1.5), {"far": ["deviation"]}),
    ("a given transform within three spreads is reproduced", [*normal(6), row("near", transform_deviation_p95_mm=5.9)],
     DecisionRules(deviation_mm=1.5), {}),
    ("a tiny spread does not make a small deviation matter",
     [*[row(f"s{i}", mean=0.01, p95=0.02) for i in range(6)], row("small", mean=0.01, p95=0.02,
                                                                 transform_deviation_p95_mm=1.4)],
     DecisionRules(deviation_mm=1.5), {}),
    ("over deviation_mm and the spread", [*[row(f"s{i}", mean=0.01, p95=0.02) for i in range(6)],
                                          row("wrong", mean=0.01, p95=0.02, transform_deviation_p95_mm=1.6)],
     DecisionRules(deviation_mm=1.5), {"wrong": ["deviation"]}),
    ("no given transform: no deviation", [*normal(6), row("none", transform_deviation_p95_mm=np.nan)],
     DecisionRules(deviation_mm=0.0), {}),
]


@pytest.mark.parametrize(("name", "rows", "rules", "expected"), CASES, ids=[c[0] for c in CASES])
def test_decision_table(name, rows, rules, expected):
    decided = decide([dict(r) for r in rows], rules)
    for r in decided:
        assert r["flag_reasons"] == expected.get(r["pair_id"], []), (name, r["pair_id"], r["flag_reasons"])
        assert r["flagged"] == bool(r["flag_reasons"])
        assert set(r["flag_reasons"]) <= set(REASONS)
        if r["status"] == "complete":
            assert math.isfinite(r["risk_score"]) and abs(r["risk_score"]) <= RISK_BOUND
        else:
            assert math.isnan(r["risk_score"])


def test_risk_score_is_a_bounded_log_ratio_to_the_cohort_median():
    rows = decide([row("a", p95=1.0), row("b", p95=2.0), row("c", p95=4.0), row("d", p95=1e9)],
                  DecisionRules(noise_floor_mm=0.0 + 1e-3))
    risk = {r["pair_id"]: r["risk_score"] for r in rows}
    assert risk["c"] - risk["b"] == pytest.approx(1.0, abs=1e-3)  # twice the spread: +1
    assert risk["d"] == RISK_BOUND
    pct = {r["pair_id"]: r["cohort_percentile"] for r in rows}
    assert pct["a"] == 25 and pct["d"] == 100


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.floats(0, 1e6), st.just(float("nan")), st.just(0.0)), min_size=1, max_size=40))
def test_every_complete_pair_gets_a_finite_bounded_score(values):
    rows = decide([row(f"p{i}", p95=v, mean=v, n=0 if v != v else 10) for i, v in enumerate(values)])
    for r in rows:
        assert math.isfinite(r["risk_score"]) and abs(r["risk_score"]) <= RISK_BOUND
        assert 0 <= r["cohort_percentile"] <= 100 or math.isnan(r["cohort_percentile"])


@pytest.mark.parametrize(("a", "b"), [
    ([1, 1, 1, 2, 3], [5, 4, 3, 2, 1]),  # ties: scipy averages them (-0.894), the old hand-written one said -1.0
    ([1, 2, 3, 4, 5], [2, 4, 6, 8, 10]),
    ([3, 1, 2, 2, 5, 4], [1, 1, 2, 3, 5, 8]),
])
def test_spearman_is_scipys_and_does_not_depend_on_order(a, b):
    assert spearman(np.array(a), np.array(b)) == pytest.approx(stats.spearmanr(a, b).statistic)
    assert spearman(np.array(a[::-1]), np.array(b[::-1])) == pytest.approx(spearman(np.array(a), np.array(b)))
    assert math.isnan(spearman(np.array([1, 1, 1]), np.array([1, 2, 3])))  # a constant input has no ranking


@pytest.mark.parametrize(("scores", "positives", "expected"), [
    ([1, 2, 3, 4], [0, 0, 1, 1], 1.0),
    ([4, 3, 2, 1], [0, 0, 1, 1], 0.0),
    ([1, 1, 1, 1], [0, 0, 1, 1], 0.5),  # ties count half
    ([1, 2, 2, 3], [0, 1, 0, 1], 0.875),
    ([1, 2], [0, 0], float("nan")),
])
def test_auroc_table(scores, positives, expected):
    value = auroc(np.array(scores, float), np.array(positives, bool))
    assert (math.isnan(value) and math.isnan(expected)) or value == pytest.approx(expected)


def test_sessions_and_ratings_files(tmp_path):
    assert session_of("sub-01_ses-02_T1w.nii.gz") == "02" and session_of("sub-01_T1w.nii.gz") == ""
    (tmp_path / "r.tsv").write_text("pair_id\trating\trater\tnote\na\tinclude\tjd\tfine\nb\tmaybe\tjd\t\n")
    with pytest.raises(RatingsError, match=r"row 3: rating 'maybe' for pair 'b'; use one of include, exclude, unsure"):
        read_ratings(tmp_path / "r.tsv")
    (tmp_path / "r.tsv").write_text("pair_id\trating\nzz\texclude\n")
    with pytest.raises(RatingsError, match="pair 'zz' is not in this run's manifest"):
        read_ratings(tmp_path / "r.tsv", {"a"})
    (tmp_path / "r.tsv").write_text("pair\trating\n")
    with pytest.raises(RatingsError, match="missing column 'pair_id'"):
        read_ratings(tmp_path / "r.tsv")


@pytest.mark.slow
def test_decision_files_rethreshold_and_ratings_that_survive(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    manifest = tiny_cohort(tmp_path / "cohort", pairs=4, empty_mask=(1,))
    out = tmp_path / "out"
    # the near-free model maps every voxel to itself: the spread is the perturbations' own (a few mm)
    args = ["--model", NEAR_FREE_MODEL, "--samples", "3", "--batch-size", "3", "--workers", "1", "--store", "minimal"]
    assert main(["run", str(manifest), "--out", str(out), *args]) == 0
    decisions = pd.read_csv(out / "decisions.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert list(decisions.columns) == ["pair_id", "subject_id", "session", "risk_score", "expected_error_mm",
                                       "expected_error_upper_mm", "calibration_in_range", "transform_deviation_mean_mm",
                                       "transform_deviation_p95_mm", "flag_reasons", "rating", "exclude"]
    by_id = decisions.set_index("pair_id")
    empty = "sub-001_sub-001_to_atlas"
    assert by_id.loc[empty, "flag_reasons"] == "empty_region" and by_id.loc[empty, "exclude"] == "true"
    assert (decisions["expected_error_mm"] == "n/a").all()  # no calibration: empty, said in the docs and report
    report = pd.read_parquet(out / "report.parquet")
    assert report.loc[report.status == "complete", "risk_score"].abs().max() <= RISK_BOUND
    assert by_id["flag_reasons"].str.contains("uncertainty").any()  # identity map: spread = perturbation size
    # re-threshold without recomputing: a huge tolerance removes every 'uncertainty' reason
    assert main(["report", str(out), "--tolerance-mm", "1000"]) == 0
    after = pd.read_csv(out / "decisions.tsv", sep="\t", dtype=str, keep_default_na=False).set_index("pair_id")
    assert not after["flag_reasons"].str.contains("uncertainty").any()
    # a person includes the empty-region pair: it leaves exclude.tsv and stays out after another plain report
    (tmp_path / "r.tsv").write_text(f"pair_id\trating\trater\tnote\n{empty}\tinclude\tjd\tchecked by eye\n")
    assert main(["report", str(out), "--ratings", str(tmp_path / "r.tsv")]) == 0
    assert main(["report", str(out)]) == 0
    excluded = pd.read_csv(out / "exclude.tsv", sep="\t", dtype=str)
    assert empty not in set(excluded["pair_id"])
    final = pd.read_csv(out / "decisions.tsv", sep="\t", dtype=str, keep_default_na=False).set_index("pair_id")
    assert final.loc[empty, "rating"] == "include" and final.loc[empty, "exclude"] == "false"
    assert final.loc[empty, "flag_reasons"] == "empty_region"  # the reason stays visible; the person decided
    # a resumed run (its own tolerance, given again) keeps the rating
    assert main(["run", str(manifest), "--out", str(out), *args, "--tolerance-mm", "1000"]) == 0
    assert "0 computed this run" in capsys.readouterr().out
    resumed = pd.read_csv(out / "decisions.tsv", sep="\t", dtype=str, keep_default_na=False).set_index("pair_id")
    assert resumed.loc[empty, "rating"] == "include" and resumed.loc[empty, "exclude"] == "false"
    assert not resumed["flag_reasons"].str.contains("uncertainty").any()
    html = (out / "report.html").read_text()
    assert "empty_region" in html and "data:image/png" in html  # figures of flagged pairs without a prediction


def test_fov_loss_counts_what_the_prediction_maps_outside_the_source():
    from equiqc.pipeline.scores import fov_loss

    phi = torch.as_tensor(np.stack(np.meshgrid(np.arange(4.0), np.arange(3.0), indexing="ij")))  # identity, 4 x 3
    assert not fov_loss(phi, (4, 3)).any()
    shifted = phi + torch.tensor([1.0, 0.0])[:, None, None]  # one row beyond the last source voxel centre
    assert fov_loss(shifted, (4, 3)).sum() == 3
    rows = decide([*normal(6), row("fov", fov_loss_fraction=0.3)])
    assert next(r for r in rows if r["pair_id"] == "fov")["flag_reasons"] == ["fov"]


def test_similarity_after_registration_and_its_reason():
    from equiqc.pipeline.scores import registered_source, similarity_after_registration

    rng = np.random.default_rng(0)
    image = torch.as_tensor(rng.random((6, 7, 5)), dtype=torch.float32)
    identity = T.identity_grid(image.shape)[0]
    region = torch.ones(image.shape, dtype=torch.bool)
    warped = registered_source(image, identity)
    assert similarity_after_registration(warped, 2 * image + 1, region) == pytest.approx(1.0)
    assert abs(similarity_after_registration(warped, torch.rand(image.shape), region)) < 0.3
    assert math.isnan(similarity_after_registration(warped, torch.ones(image.shape), region))
    cohort = [row(f"s{i}", similarity_ncc=0.9 + 0.005 * i) for i in range(8)]
    rows = decide([*cohort, row("bad", similarity_ncc=0.4)])
    assert next(r for r in rows if r["pair_id"] == "bad")["flag_reasons"] == ["similarity"]
    assert all(not r["flag_reasons"] for r in rows if r["pair_id"] != "bad")


def _result(std: np.ndarray, phi: np.ndarray | None = None, mean_map: np.ndarray | None = None) -> UncertaintyResult:
    """A result holding ``std`` (mm) and a prediction ``phi`` (identity by default), source voxels."""
    phi = T.identity_grid(std.shape)[0].numpy() if phi is None else phi
    return UncertaintyResult(std_mm=std.astype(np.float32), covariance_mm2=None, components=(), n_samples=4,
                             mean_map=phi if mean_map is None else mean_map, prediction_map=phi.astype(np.float32),
                             n_valid=np.full(std.shape, 4))


@settings(max_examples=40, deadline=None)
@given(st.tuples(st.integers(2, 9), st.integers(2, 9), st.integers(2, 9)), st.integers(0, 2**31 - 1),
       st.floats(0.0, 0.9), st.floats(0.0, 1.0))
def test_pair_summary_statistics_are_numpys_over_the_region(shape, seed, nan_fraction, region_fraction):
    rng = np.random.default_rng(seed)
    std = rng.gamma(2.0, 0.8, shape)  # mm, around the 1 and 2 mm thresholds
    std[rng.random(shape) < nan_fraction] = np.nan  # voxels without enough valid samples
    region = rng.random(shape) < region_fraction
    got = pair_summary(_result(std), np.diag([2.0, 2.0, 2.0, 1.0]), region)
    inside = std.astype(np.float32)[region & np.isfinite(std)].astype(np.float64)
    assert got["n_region_voxels"] == inside.size
    if inside.size == 0:
        assert all(math.isnan(got[k]) for k in SUMMARY_KEYS)
        return
    expected = {"uncertainty_mean_mm": inside.mean(), "uncertainty_median_mm": np.median(inside),
                "uncertainty_p95_mm": np.percentile(inside, 95), "frac_above_1mm": (inside > 1).mean(),
                "frac_above_2mm": (inside > 2).mean(), "folding_fraction": 0.0}
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


def test_pair_summary_analytic_folding_fov_labels_and_true_error():
    shape = (8, 6, 5)
    std = np.ones(shape)
    std[:4] = 3.0  # the first half of x
    identity = T.identity_grid(shape)[0].numpy()
    flipped = identity.copy()
    flipped[0] = shape[0] - 1 - identity[0]  # x mirrored: every Jacobian determinant is -1
    shifted = identity + np.array([2.0, 0, 0], np.float32)[:, None, None, None]  # 2 of 8 columns beyond the source
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    image = np.random.default_rng(1).random(shape).astype(np.float32)
    assert pair_summary(_result(std, flipped), affine)["folding_fraction"] == 1.0
    assert pair_summary(_result(std), affine)["folding_fraction"] == 0.0
    assert pair_summary(_result(std, shifted), affine, source_shape=shape)["fov_loss_fraction"] == 2 / 8
    assert pair_summary(_result(std), affine, source=image, target=image)["similarity_ncc"] == pytest.approx(1.0)
    labels = np.zeros(shape, np.int32)
    labels[:2], labels[6:], labels[3, 0, 0] = 3, 7, 9  # label 9: a voxel outside the region below
    region = np.ones(shape, bool)
    region[3] = False
    got = pair_summary(_result(std), affine, region, labels, label_names={3: "gm"})
    assert got["uncertainty_mean_mm_gm"] == 3.0 and got["uncertainty_mean_mm_label7"] == 1.0
    assert math.isnan(got["uncertainty_mean_mm_label9"]) and "uncertainty_mean_mm_label0" not in got
    # the true map one source voxel further along x than the prediction: 2 mm of error everywhere; the mean map
    # (test-time augmented) two voxels off
    truth = identity + np.array([1.0, 0, 0], np.float32)[:, None, None, None]
    mean_map = identity - np.array([1.0, 0, 0], np.float32)[:, None, None, None]
    got = pair_summary(_result(std, mean_map=mean_map), affine, ground_truth=truth)
    assert got["true_error_mean_mm"] == pytest.approx(2.0) and got["tta_error_mean_mm"] == pytest.approx(4.0)
    assert got["n_region_voxels"] == std.size


def test_local_ncc_is_one_for_an_affine_intensity_change_minus_one_inverted_zero_where_constant():
    from equiqc.pipeline.scores import lncc_window, local_ncc

    image = torch.as_tensor(np.random.default_rng(0).random((9, 10, 8)), dtype=torch.float32)
    assert torch.allclose(local_ncc(image, 3 * image + 2, 3), torch.ones(()).double(), atol=1e-5)
    assert torch.allclose(local_ncc(image, -image, 5), -torch.ones(()).double(), atol=1e-5)
    assert float(local_ncc(image, torch.ones_like(image), 3).abs().max()) == 0.0
    assert abs(float(local_ncc(image, torch.rand(image.shape), 5).mean())) < 0.2
    a, b = (torch.as_tensor(np.random.default_rng(s).random((7, 8, 6))) for s in (1, 2))
    brute = np.zeros(a.shape)  # the window cut at the edges, one box at a time
    for i, j, k in np.ndindex(*a.shape):
        box = tuple(slice(max(c - 1, 0), c + 2) for c in (i, j, k))
        x, y = a[box].numpy().ravel(), b[box].numpy().ravel()
        brute[i, j, k] = np.corrcoef(x, y)[0, 1]
    np.testing.assert_allclose(local_ncc(a, b, 3).numpy(), brute, atol=1e-5)
    assert lncc_window(np.diag([2.0, 2.0, 2.0, 1.0])) == 5 and lncc_window(np.eye(4)) == 9
    assert lncc_window(np.diag([4.0, 4.0, 4.0, 1.0])) == 3


def test_deformation_summaries_of_a_translation_a_scaling_and_a_bump():
    shape = (12, 10, 9)
    std = np.ones(shape)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    identity = T.identity_grid(shape, torch.float64)[0].numpy()
    shifted = identity + np.array([1.5, -2.0, 0.0])[:, None, None, None]  # 3 mm and 4 mm: 5 mm everywhere
    got = pair_summary(_result(std, shifted), affine)
    assert got["deformation_mean_mm"] == pytest.approx(5.0, rel=1e-5)
    assert got["nonlinear_mean_mm"] == pytest.approx(0.0, abs=1e-4)  # an affine map has no nonlinear part
    assert got["log_jacobian_sd"] == pytest.approx(0.0, abs=1e-6)
    scaled = identity * 1.1
    assert pair_summary(_result(std, scaled), affine)["nonlinear_mean_mm"] == pytest.approx(0.0, abs=1e-4)
    bump = identity.copy()
    bump[0, 4:8, 3:7, 3:6] += 1.0  # a block moved by one voxel (2 mm): a nonlinear deformation
    got = pair_summary(_result(std, bump), affine)
    assert got["nonlinear_mean_mm"] > 0.1 and got["log_jacobian_sd"] > 0.1
    image = np.random.default_rng(2).random(shape).astype(np.float32)
    same = pair_summary(_result(std), affine, source=image, target=image)
    assert same["similarity_lncc"] == pytest.approx(1.0, abs=1e-5)
    noise = pair_summary(_result(std), affine, source=image, target=np.random.default_rng(3).random(shape))
    assert noise["similarity_lncc"] < 0.3
    other_grid = pair_summary(_result(std, shifted), affine, target_affine=np.diag([2.0, 2.0, 2.0, 1.0]) @ np.array(
        [[1, 0, 0, 1.5], [0, 1, 0, -2.0], [0, 0, 1, 0], [0, 0, 0, 1]]))  # the target grid itself moved the same way
    assert other_grid["deformation_mean_mm"] == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("failing", ["similarity", "outlier"])
def test_robust_fences_keep_working_with_40_percent_failures(failing):
    rng = np.random.default_rng(0)
    good = [row(f"g{i}", p95=2.0 + 0.2 * rng.random(), similarity_ncc=0.85 + 0.03 * rng.random()) for i in range(12)]
    bad = [row(f"b{i}", p95=(12.0 + rng.random()) if failing == "outlier" else 2.0 + 0.2 * rng.random(),
               similarity_ncc=(0.2 + 0.1 * rng.random()) if failing == "similarity" else 0.85) for i in range(8)]
    rows = decide([*good, *bad])  # 8 of 20 fail: a Tukey fence's quartile lies among them
    reasons = {r["pair_id"]: r["flag_reasons"] for r in rows}
    assert all(reasons[r["pair_id"]] == [failing] for r in bad)
    assert not any(reasons[r["pair_id"]] for r in good)
    values = np.array([r["similarity_ncc"] if failing == "similarity" else -np.log(r["uncertainty_p95_mm"] + 0.1)
                       for r in rows])
    q1, q3 = np.percentile(values, [25, 75])
    assert not any(v < q1 - 1.5 * (q3 - q1) for v in values[len(good):])  # what the quartiles' fence missed


@pytest.mark.gpu
def test_pair_summary_on_a_gpu_equals_the_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    rng = np.random.default_rng(3)
    shape = (40, 48, 36)
    std = rng.gamma(2.0, 0.8, shape)
    phi = T.identity_grid(shape)[0].numpy() + rng.normal(0, 0.3, (3, *shape)).astype(np.float32)
    image, labels = rng.random(shape).astype(np.float32), rng.integers(0, 5, shape)
    kwargs = dict(labels=labels, ground_truth=phi + 0.5, source_shape=shape, source=image, target=image)
    cpu = pair_summary(_result(std, phi), np.eye(4), std > 0.5, **kwargs)
    gpu = pair_summary(_result(std, phi), np.eye(4), std > 0.5, device="cuda", **kwargs)
    assert cpu.keys() == gpu.keys()
    for key in cpu:
        assert gpu[key] == pytest.approx(cpu[key], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("shape", [(9, 8), (7, 6, 5)])
def test_closed_form_jacobian_determinant_equals_numpys(shape):

    phi = np.indices(shape).astype(np.float64) + np.random.default_rng(1).normal(0, 0.4, (len(shape), *shape))
    grads = [np.gradient(phi[i]) for i in range(len(shape))]
    expected = np.linalg.det(np.stack([np.stack(g, -1) for g in grads], -2))
    np.testing.assert_allclose(T.jacobian_determinant(torch.as_tensor(phi)[None])[0].numpy(), expected, atol=1e-12)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-5, 5) | st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=60))
def test_average_ranks_are_scipys(values):
    values = np.asarray(values, dtype=np.float64)  # small integers: many ties
    np.testing.assert_array_equal(average_ranks(values), stats.rankdata(values, method="average"))


def test_sparsification_naurc_is_0_for_the_oracle_about_1_for_chance_and_ignores_monotone_rescaling():
    rng = np.random.default_rng(0)
    error = rng.gamma(2.0, 1.0, 100_000)
    assert sparsification_naurc(error, error) == pytest.approx(0.0, abs=1e-12)
    assert sparsification_naurc(np.exp(error), error) == pytest.approx(0.0, abs=1e-12)  # only the order matters
    assert sparsification_naurc(rng.random(error.size), error) == pytest.approx(1.0, abs=0.05)
    assert sparsification_naurc(np.zeros_like(error), error) == pytest.approx(1.0, abs=0.05)  # ties: random order
    assert sparsification_naurc(-error, error) > 1.5  # the worst order
    noisy = error + rng.normal(0, 1.0, error.size)  # a map that tracks the error partly
    assert 0.05 < sparsification_naurc(noisy, error) < 0.95
    # the curve by hand on 4 voxels, 2 steps: f = 0 (all kept) and f = 1/2 (two removed)
    e, u = np.array([4.0, 1.0, 3.0, 2.0]), np.array([0.1, 0.4, 0.3, 0.2])
    by_u, oracle, chance = (2.5 + (4 + 2) / 2) / 2, (2.5 + (1 + 2) / 2) / 2, 2.5
    assert sparsification_naurc(u, e, steps=2) == pytest.approx((by_u - oracle) / (chance - oracle))
    assert math.isnan(sparsification_naurc(u, np.ones(4), steps=2))
