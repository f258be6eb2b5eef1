"""Backends: native conventions against analytic maps, the registry, the default model, MC-dropout, ICON."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from anatomy import error_mm
from hypothesis import given, settings
from hypothesis import strategies as st

from equiqc.pipeline import transforms as T
from equiqc.pipeline.backends.conventions import OutputConvention
from equiqc.pipeline.backends.default_net import NET_SHAPE
from equiqc.pipeline.backends.grids import index_matrix
from equiqc.pipeline.backends.module import ModuleBackend, enable_mc_dropout
from equiqc.pipeline.backends.registry import available, load_backend, register_backend
from equiqc.pipeline.estimator import EstimatorConfig, estimate_uncertainty, mc_dropout_config, min_valid_samples
from equiqc.pipeline.perturbations import PerturbationConfig, sample_perturbations

CONVENTIONS = [OutputConvention(k, u, a) for k in ("map", "displacement") for u in ("voxel", "unit", "normalized")
               for a in ("ij", "xy")]


@given(seed=st.integers(0, 2**31 - 1), conv=st.sampled_from(CONVENTIONS))
@settings(max_examples=30, deadline=None)
def test_conventions_round_trip(seed, conv):
    rng = np.random.default_rng(seed)
    phi = torch.as_tensor(rng.uniform(-3, 12, (2, 3, 5, 6, 7)))
    np.testing.assert_allclose(conv.to_voxel_map(conv.from_voxel_map(phi)).numpy(), phi.numpy(), atol=1e-9)


def test_grid_sample_convention_matches_grid_sample():
    # A grid_sample grid (normalised, xy order) must sample exactly where our voxel map says.
    img = torch.rand(1, 1, 6, 7, 8, dtype=torch.float64)
    phi = T.identity_grid((6, 7, 8), torch.float64) + torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64).view(
        1, 3, 1, 1, 1)
    grid = OutputConvention("map", "normalized", "xy").from_voxel_map(phi).permute(0, 2, 3, 4, 1)
    ref = torch.nn.functional.grid_sample(img, grid, align_corners=True)
    np.testing.assert_allclose(T.warp(img, phi).numpy(), ref.numpy(), atol=1e-12)


def test_index_matrices_follow_align_corners():
    m = index_matrix((10,), (5,), align_corners=False)
    assert m[0, 0] == 0.5 and m[0, 1] == -0.25  # edges aligned: voxel 0 centre at -0.25 on the net grid
    m = index_matrix((11,), (6,), align_corners=True)
    assert m[0, 0] == 0.5 and m[0, 1] == 0.0


class Shift(nn.Module):
    """An analytic 'network': source = target shifted by +2 network voxels along axis 0, in a convention."""

    def __init__(self, convention: str = "map/normalized/xy"):
        super().__init__()
        self.conv = OutputConvention.parse(convention)

    def forward(self, source, target):
        phi = T.identity_grid(target.shape[2:], target.dtype, target.device).expand(target.shape[0], -1, -1, -1, -1)
        phi = phi + torch.tensor([2.0, 0.0, 0.0], device=target.device).view(1, 3, 1, 1, 1)
        return self.conv.from_voxel_map(phi)


def make_shift(convention: str = "map/normalized/xy") -> nn.Module:
    return Shift(convention)


@pytest.mark.parametrize("convention", ["map/normalized/xy", "displacement/voxel/ij", "map/unit/ij"])
@pytest.mark.parametrize("align", [True, False])
def test_module_backend_brings_the_net_map_back_to_the_original_grids(convention, align):
    net_shape, src_shape, tgt_shape = (16, 12, 10), (31, 23, 19), (21, 12, 15)
    backend = ModuleBackend(Shift(convention), "shift", OutputConvention.parse(convention), input_shape=net_shape,
                            align_corners=align)
    phi = backend.register(torch.rand(1, 1, *src_shape), torch.rand(1, 1, *tgt_shape))
    assert phi.shape == (1, 3, *tgt_shape)
    # expected: y -> M_src^-1 (M_tgt y + 2 e0)
    m_tgt, m_src = index_matrix(tgt_shape, net_shape, align), index_matrix(src_shape, net_shape, align)
    shift = torch.eye(4, dtype=torch.float64)
    shift[0, 3] = 2.0
    want = T.affine_map(torch.linalg.inv(m_src) @ shift @ m_tgt, tgt_shape)
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2), slice(2, -2))  # net map extrapolated at edges
    np.testing.assert_allclose(phi[inner].numpy(), want[inner].numpy(), atol=1e-4)


def test_torchscript_python_factory_and_registered_backends_agree(tmp_path):
    path = tmp_path / "shift.pt"
    src, tgt = torch.rand(1, 1, 9, 10, 11), torch.rand(1, 1, 9, 10, 11)
    torch.jit.save(torch.jit.trace(Shift(), (src, tgt)), str(path))
    opts = dict(convention=OutputConvention.parse("map/normalized/xy"))
    a = load_backend(f"torchscript:{path}", **opts).register(src, tgt)
    b = load_backend("python:tests.test_backends:make_shift", **opts).register(src, tgt)
    register_backend("my-shift", lambda weights=None, device="cpu", mc_dropout=False: ModuleBackend(
        Shift(), "my-shift", OutputConvention.parse("map/normalized/xy"), device=device))
    c = load_backend("my-shift").register(src, tgt)
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)
    np.testing.assert_allclose(a.numpy(), c.numpy(), atol=1e-6)
    np.testing.assert_allclose(a[0, 0].numpy(), T.identity_grid((9, 10, 11))[0, 0].numpy() + 2, atol=1e-5)
    assert "my-shift" in available()


def test_unknown_and_broken_model_specs_are_clear():
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        load_backend("nope")
    with pytest.raises(ValueError, match="expected package.module:factory"):
        load_backend("python:nofactory")
    with pytest.raises(FileNotFoundError, match="TorchScript model not found"):
        load_backend("torchscript:/nonexistent/model.pt")


# ----------------------------------------------------------------------------------------- default model


def test_default_model_loads_strictly_and_names_a_missing_file(tmp_path):
    backend = load_backend("default")
    assert backend.name == "default" and backend.input_shape == NET_SHAPE and not backend.stochastic
    with pytest.raises(FileNotFoundError, match="--weights PATH"):
        load_backend("default", weights=str(tmp_path / "missing.pt"))
    state = torch.load(backend_weights(), weights_only=True)
    state["model"].pop(next(iter(state["model"])))
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(RuntimeError, match="Missing key"):
        load_backend("default", weights=str(tmp_path / "partial.pt"))


def backend_weights():
    from equiqc.pipeline.backends.default_net import WEIGHTS

    return WEIGHTS


def test_default_model_registers_real_anatomy_on_its_native_grid(mni_pair_2mm):
    src, tgt, affine, truth, brain = mni_pair_2mm  # 99 x 117 x 95: resampled to and from the network grid
    phi = load_backend("default").register(torch.as_tensor(src)[None, None], torch.as_tensor(tgt)[None, None])
    assert phi.shape == (1, 3, *tgt.shape)
    ident = T.identity_grid(tgt.shape)[0].numpy()
    err, base = error_mm(phi[0].numpy(), truth, affine, brain), error_mm(ident, truth, affine, brain)
    assert err < 0.5 * base, (err, base)


def test_mc_dropout_makes_the_default_model_stochastic():
    backend = load_backend("default", mc_dropout=True)
    assert backend.stochastic
    x = torch.rand(1, 1, *NET_SHAPE)
    assert not torch.equal(backend.register(x, x), backend.register(x, x))
    with pytest.raises(ValueError, match="no dropout layers"):
        enable_mc_dropout(nn.Sequential(nn.Conv3d(1, 1, 3)), "plain")
    with pytest.raises(ValueError, match="no dropout layers"):
        load_backend("affine-opt", mc_dropout=True)
    with pytest.raises(ValueError, match="MC-dropout needs a stochastic backend"):
        estimate_uncertainty(load_backend("default"), x[0], x[0], config=mc_dropout_config(4))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["equivariance", "mc-dropout"])
def test_estimator_end_to_end_with_the_default_model(mni_pair_2mm, method):
    src, tgt, affine, truth, brain = mni_pair_2mm
    backend = load_backend("default", mc_dropout=method == "mc-dropout")
    cfg = (mc_dropout_config(4, 4) if method == "mc-dropout"
           else EstimatorConfig(samples=4, batch_size=4, perturbation=PerturbationConfig(kind="rigid")))
    res = estimate_uncertainty(backend, src, tgt, affine, affine, cfg, seed=0)
    std = res.std_mm[brain & (res.n_valid >= min_valid_samples(res.n_samples))]
    assert np.isfinite(std).all() and 0.01 < std.mean() < 10.0
    assert error_mm(res.prediction_map, truth, affine, brain) < 4.0


@pytest.mark.slow
def test_estimator_end_to_end_with_the_affine_baseline(mni_pair_4mm):
    src, tgt, affine, truth, brain = mni_pair_4mm
    cfg = EstimatorConfig(samples=3, batch_size=4, perturbation=PerturbationConfig(kind="translation"))
    res = estimate_uncertainty(load_backend("affine-opt"), src, tgt, affine, affine, cfg)
    assert np.nanmean(res.std_mm[brain]) < 2.0
    assert error_mm(res.prediction_map, truth, affine, brain) < 1.5


# ------------------------------------------------------------------------------------------ uniGradICON


def test_icon_missing_weights_names_the_file_to_obtain(tmp_path):
    pytest.importorskip("unigradicon")
    with pytest.raises(FileNotFoundError, match=r"multigradicon_weights/Step_2_final.trch.*--weights"):
        load_backend("multigradicon", weights=str(tmp_path / "none.trch"))


@pytest.mark.slow
def test_icon_network_random_weights_small_shape_through_the_estimator(mni_pair_4mm):
    pytest.importorskip("unigradicon")
    src, tgt, affine, _, brain = mni_pair_4mm
    backend = load_backend("unigradicon", random_weights=True, input_shape=(128, 128, 128))
    assert backend.convention == OutputConvention("map", "unit", "ij") and not backend.align_corners
    cfg = EstimatorConfig(samples=2, batch_size=3, perturbation=PerturbationConfig(kind="translation"))
    res = estimate_uncertainty(backend, src, tgt, affine, affine, cfg)
    assert res.prediction_map.shape == (3, *tgt.shape)
    reported = res.n_valid >= min_valid_samples(res.n_samples)
    assert np.isfinite(res.prediction_map).all() and np.isfinite(res.std_mm[reported]).all()


@pytest.mark.slow
def test_full_size_icon_network_builds():
    pytest.importorskip("unigradicon")
    from equiqc.pipeline.backends.icon import ICON_SHAPE, build_network

    net = build_network()
    assert tuple(net.identity_map.shape) == (1, 3, *ICON_SHAPE)
    assert sum(p.numel() for p in net.regis_net.parameters()) > 50_000_000
    missing = net.regis_net.load_state_dict(net.regis_net.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys


def test_icon_intensity_preprocessing():
    from equiqc.pipeline.backends.icon import icon_normalise

    ct = icon_normalise("ct")(torch.tensor([[-2000.0, 0.0, 500.0, 3000.0]]))
    np.testing.assert_allclose(ct.numpy(), [[0.0, 0.5, 0.75, 1.0]])
    mri = icon_normalise("mri")(torch.linspace(0, 100, 1001)[None])
    assert float(mri.min()) == 0.0 and float(mri.max()) == 1.0 and float(mri[0, 500]) == pytest.approx(50 / 99, 1e-3)
    with pytest.raises(ValueError, match="modality"):
        icon_normalise("pet")


# ------------------------------------------------------------------------ one interpolation per sample


@pytest.mark.parametrize("layout,align_corners,net_shape", [("RAS", True, (20, 24, 18)), ("LIA", False, (22, 16, 20)),
                                                             ("SAR", True, None)])
def test_fused_perturbed_path_equals_warp_then_register(layout, align_corners, net_shape):
    # register_perturbed samples the source once, straight onto the network grid, and folds T into the map
    # back; the two-step path warps on the source grid, resamples, maps back, then applies T. Same maps up to
    # interpolation error (smooth images, so small), on anisotropic grids and a non-RAS layout.
    from doubles import IntensityDisplacement, smooth_blob

    from equiqc.pipeline.backends import base

    src, tgt = smooth_blob((30, 26, 22)), smooth_blob((28, 25, 24), centre_shift=1.5)
    a_src = torch.diag(torch.tensor([1.2, 0.9, 1.6, 1.0], dtype=torch.float64))
    a_tgt = torch.diag(torch.tensor([1.25, 1.0, 1.5, 1.0], dtype=torch.float64))
    backend = ModuleBackend(IntensityDisplacement(), "intensity", "displacement/voxel/ij", input_shape=net_shape,
                            align_corners=align_corners, intensity="none", layout=layout)
    pert = sample_perturbations(PerturbationConfig("affine", max_translation_mm=3.0, max_rotation_deg=5.0), 3,
                                src.shape[2:], a_src, seed=4)
    pair = base.prepare(backend, src, tgt, a_src, a_tgt)
    fused = base.register_perturbed(backend, pair, pert.matrices)
    moved = T.warp(src, pert.maps(range(3)))
    two_step = T.apply_affine(pert.matrices, backend.register(moved, tgt.expand(3, -1, -1, -1, -1), a_src, a_tgt))
    inside = T.inside_grid(two_step, src.shape[2:]) & T.inside_grid(fused, src.shape[2:])
    diff = (fused - two_step).norm(dim=1)[inside]
    moved_by = (two_step - T.apply_affine(pert.matrices, T.identity_grid(tgt.shape[2:]))).norm(dim=1)[inside]
    assert inside.float().mean() > 0.5 and moved_by.mean() > 0.3  # the maps are far from trivial
    assert diff.max() < 0.1 and diff.mean() < 0.01, (diff.max(), diff.mean())  # voxels
    # the unperturbed matrix gives the plain registration
    eye = torch.eye(4, dtype=torch.float64)[None]
    np.testing.assert_allclose(base.register_perturbed(backend, pair, eye).numpy(),
                               backend.register(src, tgt, a_src, a_tgt).numpy(), atol=1e-4)


@pytest.mark.parametrize("layout,align_corners,net_shape", [("RAS", True, (20, 24, 18)), ("LIA", False, (22, 16, 20))])
def test_fused_warped_path_equals_warp_then_register_for_dense_perturbations(layout, align_corners, net_shape):
    # register_warped samples the source once, at tau of the network grid's positions; the two-step path warps
    # the source on its own grid by the dense map, then the adapter resamples it onto the network grid. Same
    # predictions up to interpolation error, anisotropic grids, a non-RAS layout.
    from doubles import IntensityDisplacement, smooth_blob

    from equiqc.pipeline.backends import base

    src, tgt = smooth_blob((30, 26, 22)), smooth_blob((28, 25, 24), centre_shift=1.5)
    a_src = torch.diag(torch.tensor([1.2, 0.9, 1.6, 1.0], dtype=torch.float64))
    a_tgt = torch.diag(torch.tensor([1.25, 1.0, 1.5, 1.0], dtype=torch.float64))
    net = IntensityDisplacement(gains=(20.0, -15.0, 10.0))  # gains that make the perturbations move the maps
    backend = ModuleBackend(net, "intensity", "displacement/voxel/ij", input_shape=net_shape,
                            align_corners=align_corners, intensity="none", layout=layout)
    pert = sample_perturbations(PerturbationConfig("diffeomorphic", velocity_std_mm=2.0, control_spacing_mm=10.0),
                                3, src.shape[2:], a_src, seed=4)
    tau = pert.dense(range(3))
    pair = base.prepare(backend, src, tgt, a_src, a_tgt)

    def no_grid_sample(*args):
        raise AssertionError("the network grid is axis-aligned: tau should be interpolated separably")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(T, "sample_displacement", no_grid_sample)
        fused = base.register_warped(backend, pair, tau)
    two_step = backend.register(T.warp(src, pert.maps(range(3))), tgt.expand(3, -1, -1, -1, -1), a_src, a_tgt)
    plain = base.register_warped(_RegisterOnly(backend), base.PreparedPair(src, tgt, a_src, a_tgt),
                                 tau)  # the fallback is the two-step path
    np.testing.assert_allclose(plain.numpy(), two_step.numpy(), atol=1e-5)
    unperturbed = backend.register(src, tgt, a_src, a_tgt)
    inside = T.inside_grid(two_step, src.shape[2:]) & T.inside_grid(fused, src.shape[2:])
    diff = (fused - two_step).norm(dim=1)[inside]
    moved_by = (two_step - unperturbed).norm(dim=1)[inside]
    assert inside.float().mean() > 0.5 and moved_by.mean() > 0.3  # the perturbations change the prediction
    # measured: mean 0.032 of 0.94-0.96 voxels moved, max 0.44-0.58 (one interpolation against two); sampling
    # at the unperturbed positions would differ by about the whole 0.95
    assert diff.mean() < 0.05 * moved_by.mean() and diff.max() < 0.8, (diff.max(), diff.mean())


class _RegisterOnly:
    """A third-party adapter with ``register`` only (no hooks)."""

    def __init__(self, backend):
        self.name, self.device, self.stochastic, self.input_shape = "plain", backend.device, False, None
        self.register = backend.register


def test_default_hooks_fall_back_to_register_for_a_plain_adapter():
    from doubles import ExactSolver, coordinate_source

    from equiqc.pipeline.backends import base

    solver = ExactSolver()
    src = coordinate_source((12, 10, 9))
    m = torch.eye(4, dtype=torch.float64)
    m[:3, 3] = torch.tensor([0.5, -0.3, 0.2])
    tgt = torch.cat([T.affine_map(m, (8, 8, 8)), torch.ones(1, 1, 8, 8, 8)], 1)
    pair = base.prepare(solver, src, tgt, torch.eye(4, dtype=torch.float64), torch.eye(4, dtype=torch.float64))
    assert isinstance(pair, base.PreparedPair)
    shift = torch.eye(4, dtype=torch.float64)[None].repeat(2, 1, 1)
    shift[:, :3, 3] = torch.tensor([[0.4, 0.0, -0.2], [-0.3, 0.2, 0.1]])
    psi = base.register_perturbed(solver, pair, shift)  # T o R(A o T, B) = R(A, B) for an exact solver
    np.testing.assert_allclose(psi.numpy(), T.affine_map(m, (8, 8, 8)).expand(2, -1, -1, -1, -1).numpy(), atol=1e-3)


def test_check_prediction_names_non_finite_coordinates_and_wrong_shapes():
    from equiqc.pipeline.backends.base import check_prediction

    phi = torch.zeros(2, 3, 4, 4, 4)
    assert check_prediction(phi, 2, (4, 4, 4)) is phi
    phi[1, 0, 2, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="1 non-finite coordinates"):
        check_prediction(phi, 2, (4, 4, 4))
    with pytest.raises(ValueError, match=r"expected \(3, 3, 4, 4, 4\)"):
        check_prediction(phi, 3, (4, 4, 4))
    huge = torch.full((1, 3, 4, 4, 4), 3e37)  # the sum overflows; the coordinates are finite
    assert check_prediction(huge, 1, (4, 4, 4)) is huge


def test_a_target_shared_by_pairs_is_prepared_once():
    from doubles import IntensityDisplacement, smooth_blob

    backend = ModuleBackend(IntensityDisplacement(), "intensity", "displacement/voxel/ij", input_shape=(12, 10, 8),
                            intensity="percentile")
    template, other = smooth_blob((16, 14, 12)), smooth_blob((16, 14, 12), centre_shift=2.0)
    first = backend.prepare(smooth_blob((15, 15, 15)), template)
    again = backend.prepare(smooth_blob((13, 17, 15), centre_shift=1.0), template.clone())  # same voxels
    assert again.target_net is first.target_net and again.target_base is first.target_base
    changed = backend.prepare(smooth_blob((15, 15, 15)), other)
    assert changed.target_net is not first.target_net
    assert not torch.equal(changed.target_net, first.target_net)
