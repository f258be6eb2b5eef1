"""The estimator against analytic models: exact equivariance, first-order theory, split, determinism."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from doubles import ExactSolver, NoisySolver, coordinate_source, coordinate_target

from equiqc.pipeline import transforms as T
from equiqc.pipeline.estimator import EstimatorConfig, estimate_uncertainty, min_valid_samples
from equiqc.pipeline.perturbations import KINDS, PerturbationConfig, sample_perturbations

SOURCE_SHAPE = (26, 24, 22)
TARGET_SHAPE = (12, 11, 10)
# Anisotropic, oblique-free voxel-to-world affines (mm); different grids for source and target.
SOURCE_AFFINE = np.array([[1.2, 0, 0, -15.0], [0, 0.9, 0, 8.0], [0, 0, 1.6, 3.0], [0, 0, 0, 1]])
TARGET_AFFINE = np.array([[2.0, 0, 0, 0.0], [0, 2.0, 0, 0.0], [0, 0, 2.0, 0.0], [0, 0, 0, 1]])
SIGMA_MM2 = np.array([[0.50, 0.12, 0.00], [0.12, 0.30, -0.05], [0.00, -0.05, 0.40]])


def true_map(d: int = 3) -> torch.Tensor:
    """An oblique affine phi_AB: target grid -> source voxels, landing well inside the source."""
    if d == 2:
        m = torch.tensor([[1.1, 0.15, 5.0], [-0.1, 0.95, 6.0], [0, 0, 1]], dtype=torch.float64)
        return T.affine_map(m, TARGET_SHAPE[:2], torch.float64)
    m = torch.tensor([[1.05, 0.1, 0.0, 7.0], [-0.08, 1.0, 0.05, 6.5], [0.0, -0.06, 0.95, 6.0], [0, 0, 0, 1]],
                     dtype=torch.float64)
    return T.affine_map(m, TARGET_SHAPE, torch.float64)


def pair(d: int = 3):
    phi = true_map(d)
    src_shape = SOURCE_SHAPE[:d]
    return coordinate_source(src_shape), coordinate_target(phi, src_shape), phi


def affine2d(a: np.ndarray) -> np.ndarray:
    out = np.eye(3)
    out[:2, :2], out[:2, 2] = a[:2, :2], a[:2, 3]
    return out


@pytest.mark.parametrize("kind", KINDS)  # every family a run can ask for
def test_exact_model_gives_back_the_affine_with_zero_spread(kind):
    source, target, phi = pair()
    model = ExactSolver("affine" if kind != "diffeomorphic" else "dense")
    cfg = EstimatorConfig(samples=6, batch_size=4, perturbation=PerturbationConfig(kind=kind))
    res = estimate_uncertainty(model, source, target, SOURCE_AFFINE, TARGET_AFFINE, cfg, seed=1)
    inside = res.n_valid >= min_valid_samples(res.n_samples)
    assert inside.mean() > 0.9
    tol = 1e-3 if kind != "diffeomorphic" else 0.05  # mm; dense tau is only known up to interpolation
    assert np.nanmax(res.std_mm[inside]) < tol
    assert np.isnan(res.std_mm[~inside]).all()
    np.testing.assert_allclose(res.prediction_map, phi[0].numpy(), atol=1e-3)
    np.testing.assert_allclose(res.mean_map[:, inside], phi[0].numpy()[:, inside], atol=tol)
    assert res.n_samples == 6 and res.n_valid.max() == 6
    assert model.calls == 2 and max(model.batch_sizes) <= 4  # 7 forwards (with the unperturbed) in 2 calls


def test_exact_model_2d():
    source, target, phi = pair(2)
    cfg = EstimatorConfig(samples=5, batch_size=3, perturbation=PerturbationConfig(kind="affine"))
    res = estimate_uncertainty(ExactSolver(), source, target, affine2d(SOURCE_AFFINE), affine2d(TARGET_AFFINE),
                               cfg)
    assert res.covariance_mm2.shape == (3, *TARGET_SHAPE[:2])
    assert np.nanmax(res.std_mm) < 1e-3
    np.testing.assert_allclose(res.prediction_map, phi[0].numpy(), atol=1e-3)


def test_fov_counts_samples_that_leave_the_source():
    # A true map reaching past the source edge: voxels mapped outside have no valid sample.
    source, _, _ = pair()
    m = torch.eye(4, dtype=torch.float64)
    m[0, 3] = 18.0  # target rows 8.. land beyond the source's last row (25)
    phi = T.affine_map(m, TARGET_SHAPE, torch.float64)
    target = coordinate_target(phi, SOURCE_SHAPE)
    cfg = EstimatorConfig(samples=8, perturbation=PerturbationConfig(kind="translation"))
    res = estimate_uncertainty(ExactSolver(), source, target, SOURCE_AFFINE, TARGET_AFFINE, cfg)
    assert (res.n_valid[8:] == 0).all() and (res.n_valid[:8] == 8).all()
    assert np.isnan(res.mean_map[:, 8:]).all() and np.isnan(res.std_mm[8:]).all()
    # With prediction noise, row 7 (mapped exactly onto the last source row) keeps only some samples.
    noisy = NoisySolver(SIGMA_MM2, SOURCE_AFFINE, seed=1)
    res = estimate_uncertainty(noisy, source, target, SOURCE_AFFINE, TARGET_AFFINE, cfg)
    assert 2 < res.n_valid[7, 3:, 3:].mean() < 6 and (res.n_valid[:5, 3:, 3:] == 8).all()


def _voxel_average(cov: np.ndarray, comps) -> np.ndarray:
    full = np.zeros((3, 3))
    for c, (i, j) in enumerate(comps):
        full[i, j] = full[j, i] = np.nanmean(cov[c])
    return full


def test_translation_covariance_equals_injected_sigma():
    source, target, _ = pair()
    model = NoisySolver(SIGMA_MM2, SOURCE_AFFINE, seed=3)
    cfg = EstimatorConfig(samples=64, batch_size=8, perturbation=PerturbationConfig(kind="translation"))
    res = estimate_uncertainty(model, source, target, SOURCE_AFFINE, TARGET_AFFINE, cfg, seed=2)
    est = _voxel_average(res.covariance_mm2, res.components)
    # Per-voxel estimates from 64 samples averaged over ~1300 voxels: sampling error ~0.5 %.
    np.testing.assert_allclose(est, SIGMA_MM2, atol=0.02)
    np.testing.assert_allclose(np.nanmean(res.std_mm ** 2), np.trace(SIGMA_MM2), rtol=0.03)


def test_affine_covariance_follows_first_order_theory():
    source, target, _ = pair()
    pcfg = PerturbationConfig(kind="affine", max_rotation_deg=25, max_log_scale=0.3, max_shear=0.3,
                              max_translation_mm=2.0)
    k, seed = 64, 5
    model = NoisySolver(SIGMA_MM2, SOURCE_AFFINE, seed=4)
    cfg = EstimatorConfig(samples=k, batch_size=8, perturbation=pcfg)
    res = estimate_uncertainty(model, source, target, SOURCE_AFFINE, TARGET_AFFINE, cfg, seed=seed)
    # Expected: E_k[A_k Sigma A_k^T], A_k the world-space linear part of the same perturbations.
    pert = sample_perturbations(pcfg, k, SOURCE_SHAPE, torch.as_tensor(SOURCE_AFFINE), seed)
    a = torch.as_tensor(SOURCE_AFFINE)
    world = a @ pert.matrices @ torch.linalg.inv(a)
    lin = world[:, :3, :3].numpy()
    expected = np.mean([m @ SIGMA_MM2 @ m.T for m in lin], axis=0)
    est = _voxel_average(res.covariance_mm2, res.components)
    np.testing.assert_allclose(est, expected, atol=0.025)
    assert np.abs(expected - SIGMA_MM2).max() > 0.05  # the test can tell A Sigma A^T from Sigma


def test_bias_jitter_and_intrinsic_spread_split():
    source, target, _ = pair()
    alpha, k, draws, seed = 0.5, 48, 3, 7
    pcfg = PerturbationConfig(kind="translation", max_translation_mm=4.0)
    model = NoisySolver(SIGMA_MM2, SOURCE_AFFINE, bias_per_translation=alpha, seed=8)
    cfg = EstimatorConfig(samples=k, batch_size=6, draws=draws, perturbation=pcfg)
    res = estimate_uncertainty(model, source, target, SOURCE_AFFINE, TARGET_AFFINE, cfg, seed=seed)
    assert res.n_samples == k * draws
    np.testing.assert_allclose(res.intrinsic_spread_mm2 + res.bias_jitter_mm2, res.covariance_mm2,
                               rtol=1e-5, atol=1e-6)
    intrinsic = _voxel_average(res.intrinsic_spread_mm2, res.components)
    np.testing.assert_allclose(intrinsic, SIGMA_MM2, atol=0.02)
    # Bias alpha * t_k (t in source voxels) is alpha * t_k(mm) in world space: its spread over the K draws.
    pert = sample_perturbations(pcfg, k, SOURCE_SHAPE, torch.as_tensor(SOURCE_AFFINE), seed)
    t_mm = (SOURCE_AFFINE[:3, :3] @ pert.matrices[:, :3, 3].numpy().T).T
    dev = alpha * (t_mm - t_mm.mean(0))
    expected = draws * dev.T @ dev / (k * draws - 1)
    jitter = _voxel_average(res.bias_jitter_mm2, res.components)
    np.testing.assert_allclose(jitter, expected, atol=0.03)
    assert np.diag(expected).min() > 0.5  # a jitter the test can see (alpha^2 a^2 / 3 ~ 1.3 mm^2)


def test_draws_need_a_stochastic_backend():
    source, target, _ = pair()
    with pytest.raises(ValueError, match="stochastic"):
        estimate_uncertainty(ExactSolver(), source, target, config=EstimatorConfig(samples=4, draws=2))


def test_bad_backend_output_is_reported():
    class Broken(ExactSolver):
        def register(self, source, target, source_affine=None, target_affine=None):
            return super().register(source, target)[:, :2]

    source, target, _ = pair()
    with pytest.raises(ValueError, match="expected"):
        estimate_uncertainty(Broken(), source, target, config=EstimatorConfig(samples=4))


@pytest.mark.parametrize("kind", ["rigid", "diffeomorphic"])
def test_same_seed_same_numbers(kind):
    source, target, _ = pair()
    pcfg = PerturbationConfig(kind=kind)
    cfg = EstimatorConfig(samples=6, batch_size=3, perturbation=pcfg)
    mode = "affine" if kind == "rigid" else "dense"

    def run(seed):
        model = NoisySolver(SIGMA_MM2, SOURCE_AFFINE, mode=mode, seed=None)  # draws from the global RNG
        return estimate_uncertainty(model, source, target, SOURCE_AFFINE, TARGET_AFFINE, cfg, seed=seed)

    a, b, c = run(11), run(11), run(12)
    for name in ("std_mm", "covariance_mm2", "mean_map", "prediction_map", "n_valid"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.std_mm, c.std_mm)


def test_batch_size_does_not_change_the_result():
    source, target, _ = pair()
    pcfg = PerturbationConfig(kind="rigid")
    results = []
    for b in (1, 5):
        model = NoisySolver(None, SOURCE_AFFINE, bias_per_translation=0.3)  # deterministic, tau-dependent
        cfg = EstimatorConfig(samples=10, batch_size=b, include_unperturbed=True, perturbation=pcfg)
        results.append(estimate_uncertainty(model, source, target, SOURCE_AFFINE, TARGET_AFFINE, cfg, seed=3))
    assert results[0].n_samples == 11
    assert np.nanmean(results[0].std_mm) > 0.3
    np.testing.assert_allclose(results[0].covariance_mm2, results[1].covariance_mm2, rtol=1e-4, atol=1e-5)


MEMORY_PROBE = textwrap.dedent("""
    import json, resource, sys
    import numpy as np, torch
    sys.path.insert(0, {root!r})
    from equiqc.pipeline.estimator import EstimatorConfig, estimate_uncertainty
    from equiqc.pipeline.perturbations import PerturbationConfig
    from doubles import NoisySolver, coordinate_source, coordinate_target
    from equiqc.pipeline import transforms as T
    torch.set_num_threads(1)
    shape = (48, 48, 48)
    phi = T.affine_map(torch.eye(4, dtype=torch.float64), shape, torch.float64)
    src, tgt = coordinate_source(shape), coordinate_target(phi, shape)
    model = NoisySolver(np.eye(3) * 0.3, np.eye(4), seed=0)
    cfg = EstimatorConfig(samples={k}, batch_size=2, perturbation=PerturbationConfig(kind="translation"))
    estimate_uncertainty(model, src, tgt, config=cfg)
    print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
""")


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_k(tmp_path):
    import pathlib

    root = str(pathlib.Path(__file__).resolve().parent)  # for `from doubles import`
    # Large buffers through mmap, so the peak RSS measures what is live rather than glibc's heap
    # fragmentation (without it the heap creeps by ~0.3 MB per batch, measured, then is reused).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    peaks = {}
    for k in (8, 64):
        out = subprocess.run([sys.executable, "-c", MEMORY_PROBE.format(root=root, k=k)], capture_output=True,
                             text=True, check=True, env=env)
        peaks[k] = json.loads(out.stdout.strip().splitlines()[-1])
    one_sample = 3 * 48**3 * 8  # one composed map in float64: 2.6 MB
    # Keeping all samples would cost 56 more of them (~150 MB); streaming must stay within one.
    assert peaks[64] - peaks[8] < one_sample, peaks


# ---------------------------------------------------------------- statistics, batch size, spread-only mode


OBLIQUE_AFFINE = np.array([[1.1, 0.2, 0.0, -12.0], [-0.15, 0.95, 0.1, 5.0], [0.05, -0.1, 1.4, 2.0], [0, 0, 0, 1]])


@pytest.mark.parametrize("affine", [SOURCE_AFFINE, OBLIQUE_AFFINE], ids=["axis-aligned", "oblique"])
def test_statistics_match_a_two_pass_float64_reference(affine):
    # Every composed sample psi_k is recomputed one at a time, converted to mm in float64 and reduced with numpy:
    # the streamed float32 voxel-unit sums, converted once at the end, must agree.
    from equiqc.pipeline.backends import base
    from equiqc.pipeline.estimator import with_identity

    source, target, _ = pair()
    model = NoisySolver(None, affine, bias_per_translation=0.3)  # deterministic, tau-dependent error
    cfg = EstimatorConfig(samples=9, batch_size=4, perturbation=PerturbationConfig(kind="rigid"))
    res = estimate_uncertainty(model, source, target, affine, TARGET_AFFINE, cfg, seed=5)
    pert = with_identity(sample_perturbations(cfg.perturbation, 9, SOURCE_SHAPE, torch.as_tensor(affine), 5))
    a_src = torch.as_tensor(affine)
    prepared = base.prepare(model, source, target, a_src, torch.as_tensor(TARGET_AFFINE))
    psi = torch.cat([base.register_perturbed(model, prepared, pert.matrices[k:k + 1]) for k in range(9)]).double()
    valid = T.inside_grid(psi, SOURCE_SHAPE).numpy()
    mm = T.voxel_to_mm(psi, a_src).numpy()
    full = valid.all(0)
    assert full.mean() > 0.5
    ref_cov = np.einsum("kivxyz,kjvxyz->ijvxyz", *(2 * [mm.reshape(9, 3, 1, *mm.shape[2:])
                                                         - mm.mean(0, keepdims=True)[:, :, None]]))[..., 0, :, :, :] / 8
    ref_std = np.sqrt(np.trace(ref_cov))
    np.testing.assert_allclose(res.std_mm[full], ref_std[full], rtol=1e-4, atol=1e-5)
    comps = [(0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)]
    np.testing.assert_allclose(res.covariance_mm2[:, full], np.stack([ref_cov[i, j] for i, j in comps])[:, full],
                               rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(res.mean_map[:, full], psi.numpy().mean(0)[:, full], atol=1e-4)
    # the spread-only mode gives the same std without the covariance
    lean = estimate_uncertainty(model, source, target, affine, TARGET_AFFINE,
                                EstimatorConfig(samples=9, batch_size=4, perturbation=cfg.perturbation,
                                                covariance=False), seed=5)
    assert lean.covariance_mm2 is None
    np.testing.assert_allclose(lean.std_mm, res.std_mm, rtol=1e-5, atol=1e-6)


def test_out_of_memory_halves_an_automatic_batch_and_remembers_it(monkeypatch):
    from doubles import OutOfMemoryAbove

    from equiqc.pipeline import estimator as E

    source, target, _ = pair()
    cfg = EstimatorConfig(samples=10, perturbation=PerturbationConfig(kind="rigid"))  # batch size: automatic
    assert cfg.batch_size is None and E.default_batch_size("cpu", 11) == 1
    reference = estimate_uncertainty(ExactSolver(), source, target, SOURCE_AFFINE, TARGET_AFFINE, cfg, seed=2)
    monkeypatch.setattr(E, "default_batch_size", lambda device, samples: 11)  # as on a GPU: all at once
    model = OutOfMemoryAbove(ExactSolver(), limit=3)
    res = estimate_uncertainty(model, source, target, SOURCE_AFFINE, TARGET_AFFINE, cfg, seed=2)
    assert model.batch_sizes[:3] == [11, 5, 2] and set(model.batch_sizes[3:]) == {2, 1}
    assert res.batch_size == 2
    np.testing.assert_allclose(res.std_mm, reference.std_mm, atol=1e-5)
    model.batch_sizes.clear()  # the next pair of the same shapes starts at the size that fitted
    estimate_uncertainty(model, source, target, SOURCE_AFFINE, TARGET_AFFINE, cfg, seed=3)
    assert max(model.batch_sizes) == 2
    with pytest.raises(torch.OutOfMemoryError):  # an explicit batch size is the user's choice: no halving
        estimate_uncertainty(OutOfMemoryAbove(ExactSolver(), 3), source, target, SOURCE_AFFINE, TARGET_AFFINE,
                             EstimatorConfig(samples=10, batch_size=4, perturbation=cfg.perturbation), seed=2)


# ------------------------------------------------------------------------ prediction and validity


def test_std_is_reported_only_where_a_quarter_of_the_samples_are_valid():

    assert [min_valid_samples(n) for n in (2, 3, 4, 16, 50)] == [2, 3, 3, 4, 13]
    source, target, _ = pair()
    # a model that follows large translations (error = the translation) maps many samples outside the source
    cfg = EstimatorConfig(samples=16, perturbation=PerturbationConfig(kind="translation", max_translation_mm=20.0))
    model = NoisySolver(None, SOURCE_AFFINE, bias_per_translation=1.0)
    res = estimate_uncertainty(model, source, target, SOURCE_AFFINE, TARGET_AFFINE, cfg, seed=3)
    few = (res.n_valid >= 2) & (res.n_valid < 4)
    assert few.any() and (res.n_valid >= 4).any()
    assert np.isnan(res.std_mm[res.n_valid < 4]).all() and np.isnan(res.covariance_mm2[:, res.n_valid < 4]).all()
    assert np.isfinite(res.std_mm[res.n_valid >= 4]).all()


def test_a_stochastic_backend_stores_its_deterministic_prediction():
    from equiqc.pipeline.backends.module import ModuleBackend
    from equiqc.pipeline.estimator import mc_dropout_config

    class DropoutNet(torch.nn.Module):  # zero displacement plus dropout noise
        def __init__(self):
            super().__init__()
            self.drop = torch.nn.Dropout(0.5)

        def forward(self, source, target):
            return self.drop(torch.ones(source.shape[0], 3, *target.shape[2:])) - 1

    src, tgt = torch.rand(1, 1, 10, 9, 8), torch.rand(1, 1, 10, 9, 8)
    plain = ModuleBackend(DropoutNet(), "drop", "displacement/voxel/ij", intensity="none")
    mc = ModuleBackend(DropoutNet(), "drop", "displacement/voxel/ij", intensity="none", mc_dropout=True)
    res = estimate_uncertainty(mc, src, tgt, config=mc_dropout_config(6))
    np.testing.assert_allclose(res.prediction_map, plain.register(src, tgt)[0].numpy(), atol=1e-5)
    assert np.nanmean(res.std_mm) > 0.1  # the samples themselves are random draws
    assert mc.stochastic and any(m.training for m in mc.net.modules())  # dropout back on after the prediction
