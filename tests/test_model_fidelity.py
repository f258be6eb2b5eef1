"""Every adapter gives the registration its model's own reference code gives, with non-trivial weights.

* uniGradICON: equiqc's ``unigradicon`` backend vs ``icon_registration.itk_wrapper.register_pair`` (the code
  behind ``unigradicon-register``) on the same network with random weights whose zero-initialised layers are
  drawn (std 0.03), at 96^3, on an RAS-stored pair and with an oblique source; agreement in world mm.
* MultiPropReg: the adapter on the package's own atlas files (their true LIA affine) vs the package's own
  ``net(moving, fixed)`` flow and warped image.
* The default model: the adapter vs the network on its own grid.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from equiqc.pipeline import transforms as T
from equiqc.pipeline.backends.layout import InputLayout
from equiqc.pipeline.backends.registry import load_backend
from equiqc.storage.nifti import load_volume, save_volume
from equiqc.workflows.demo import rigidly_moved

# ------------------------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("code", ["RAS", "LIA", "SAR", "PLS", "IRP"])
def test_a_layout_round_trip_is_exact_and_maps_come_back_in_ras(code):
    """A map computed entirely in the layout (here: a known affine map) comes back as the RAS map."""
    layout = InputLayout(code)
    src_shape, tgt_shape = (5, 6, 7), (4, 8, 3)
    x = torch.arange(np.prod(tgt_shape), dtype=torch.float32).reshape(1, 1, *tgt_shape)
    back = x
    lay = layout.to_layout(x)
    assert sorted(lay.shape[2:]) == sorted(tgt_shape)
    # the layout's index -> RAS index matrix of each grid, from the code (independent of the implementation)
    def index_matrix(shape):
        m = torch.zeros(4, 4, dtype=torch.float64)
        m[3, 3] = 1
        for i, a in enumerate(layout.axes):
            m[a, i] = -1.0 if layout.flips[i] else 1.0
            m[a, 3] = (shape[a] - 1) if layout.flips[i] else 0.0
        return m  # RAS index = m @ layout index
    truth = torch.tensor([[1.0, 0.1, 0, 0.5], [0, 0.9, 0.2, -1], [0.05, 0, 1.1, 0.3], [0, 0, 0, 1]],
                         dtype=torch.float64)  # RAS target index -> RAS source index
    m_src, m_tgt = index_matrix(src_shape), index_matrix(tgt_shape)
    in_layout = torch.linalg.inv(m_src) @ truth @ m_tgt  # layout target index -> layout source index
    phi_layout = T.affine_map(in_layout, tuple(lay.shape[2:]), torch.float64)
    phi = layout.map_to_ras(phi_layout, src_shape)
    torch.testing.assert_close(phi, T.affine_map(truth, tgt_shape, torch.float64), atol=1e-9, rtol=0)
    assert torch.equal(InputLayout("RAS").to_layout(back), back)


def test_bad_layouts_are_refused():
    for bad in ("RAR", "XYZ", "RA", 3):
        with pytest.raises(ValueError, match="input layout"):
            InputLayout(bad)


# ------------------------------------------------------------------------------------------- default model


def test_default_adapter_equals_the_network_on_its_own_grid(mni_pair_4mm):
    from equiqc.pipeline.backends.default_net import NET_SHAPE
    from equiqc.pipeline.backends.grids import resample_to
    from equiqc.pipeline.backends.module import percentile_normalise

    data, moved, affine, _, brain = mni_pair_4mm
    backend = load_backend("default")
    src = resample_to(torch.as_tensor(moved)[None, None], NET_SHAPE, True)
    tgt = resample_to(torch.as_tensor(data)[None, None], NET_SHAPE, True)
    ours = backend.register(src, tgt, torch.eye(4, dtype=torch.float64), torch.eye(4, dtype=torch.float64))
    with torch.no_grad():
        reference = backend.net(percentile_normalise(src), percentile_normalise(tgt))
    assert (reference - T.identity_grid(NET_SHAPE, reference.dtype)).abs().max() > 0.5  # a non-trivial map
    torch.testing.assert_close(ours, reference.float(), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------- uniGradICON


ICON_TEST_SHAPE = (96, 96, 96)


@pytest.fixture(scope="module")
def icon_net():
    """uniGradICON's network at 96^3 with random weights, zero-initialised layers drawn with std 0.03."""
    pytest.importorskip("unigradicon")
    pytest.importorskip("itk")
    from equiqc.pipeline.backends.icon import build_network

    net = build_network(ICON_TEST_SHAPE)
    g = torch.Generator().manual_seed(0)
    drawn = 0
    with torch.no_grad():
        for p in net.regis_net.parameters():
            if p.abs().max() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.03)
                drawn += 1
    assert drawn > 0
    return net.eval()


def _icon_pair(folder, oblique: bool):
    """MNI152 2 mm as the target; a cropped, rigidly moved copy as the source (RAS-stored; oblique header)."""
    from nilearn.datasets import load_mni152_template

    tpl = load_mni152_template(resolution=2)
    data = np.asarray(tpl.dataobj, dtype=np.float32)
    affine = np.asarray(tpl.affine, dtype=np.float64)
    moved, _ = rigidly_moved(data, affine, (4.0, -3.0, 5.0), (5.0, -4.0, 3.0))
    src = np.ascontiguousarray(moved[5:85, 8:100, 6:84])
    a_src = affine.copy()
    a_src[:3, 3] = affine[:3, :3] @ [5, 8, 6] + affine[:3, 3]
    if oblique:  # 8 degrees about S then 5 about R: still closest to RAS, so still stored R, A, S
        def rot(axis, deg):
            r, c, s = np.eye(3), np.cos(np.radians(deg)), np.sin(np.radians(deg))
            i, j = [k for k in range(3) if k != axis]
            r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
            return r
        a_src[:3, :3] = rot(0, 5) @ rot(2, 8) @ a_src[:3, :3]
    save_volume(folder / "fixed.nii.gz", data, affine)
    save_volume(folder / "moving.nii.gz", src, a_src)
    return folder / "moving.nii.gz", folder / "fixed.nii.gz", data > np.percentile(data, 60)


def _reference_world_map(net, moving_path, fixed_path) -> np.ndarray:
    """register_pair's phi_AB at the fixed image's voxel centres, world RAS mm, array (x, y, z, 3) of the file."""
    import itk
    import unigradicon
    from icon_registration import itk_wrapper

    fixed = unigradicon.preprocess(itk.imread(str(fixed_path), itk.F), modality="mri")
    moving = unigradicon.preprocess(itk.imread(str(moving_path), itk.F), modality="mri")
    phi_ab, _ = itk_wrapper.register_pair(net, moving, fixed, finetune_steps=None)
    to_field = itk.TransformToDisplacementFieldFilter[itk.Image[itk.Vector[itk.F, 3], 3], itk.D].New()
    to_field.SetTransform(phi_ab)
    to_field.SetReferenceImage(fixed)
    to_field.SetUseReferenceImage(True)
    to_field.Update()
    disp_lps = np.array(to_field.GetOutput()).transpose(2, 1, 0, 3)  # ITK (z, y, x, 3) -> (x, y, z, 3)
    img = load_volume(fixed_path)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in img.data.shape], indexing="ij"), -1)
    world = ijk @ img.affine[:3, :3].T + img.affine[:3, 3]
    return world + disp_lps * np.array([-1.0, -1.0, 1.0])  # LPS -> RAS


def _equiqc_world_map(net, moving_path, fixed_path, layout: str | None = None) -> np.ndarray:
    options = {"layout": layout} if layout else {}
    backend = load_backend("unigradicon", random_weights=True, input_shape=ICON_TEST_SHAPE, **options)
    backend.net.icon.load_state_dict(net.state_dict())
    src, tgt = load_volume(moving_path), load_volume(fixed_path)
    phi = backend.register(torch.as_tensor(src.data)[None, None], torch.as_tensor(tgt.data)[None, None],
                           torch.as_tensor(src.affine), torch.as_tensor(tgt.affine))
    return T.voxel_to_mm(phi.double(), torch.as_tensor(src.affine))[0].permute(1, 2, 3, 0).numpy()


@pytest.mark.slow
@pytest.mark.parametrize("oblique", [False, True], ids=["ras", "oblique-source"])
def test_unigradicon_equals_register_pair(icon_net, tmp_path, oblique):
    moving, fixed, brain = _icon_pair(tmp_path, oblique)
    reference = _reference_world_map(icon_net, moving, fixed)
    ours = _equiqc_world_map(icon_net, moving, fixed)
    gap = np.linalg.norm(ours - reference, axis=-1)[brain]
    img = load_volume(fixed)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in img.data.shape], indexing="ij"), -1)
    moved_mm = np.linalg.norm(reference - (ijk @ img.affine[:3, :3].T + img.affine[:3, 3]), axis=-1)[brain]
    print(f"uniGradICON vs register_pair ({'oblique' if oblique else 'RAS'} source): median {np.median(gap):.2e} mm, "
          f"p95 {np.percentile(gap, 95):.2e}, max {gap.max():.2e}; the network moves points by a median "
          f"{np.median(moved_mm):.1f} mm")
    assert np.median(moved_mm) > 2.0  # non-trivial weights: a real displacement to agree on
    assert np.median(gap) < 0.05 and np.percentile(gap, 95) < 0.1
    if not oblique:  # the RAS+ array order the adapter used to hand the network is measurably different
        before = np.linalg.norm(_equiqc_world_map(icon_net, moving, fixed, layout="RAS") - reference, axis=-1)[brain]
        print(f"with the RAS+ array order instead: median {np.median(before):.2f} mm")
        assert np.median(before) > 1.0


# ------------------------------------------------------------------------------------------- MultiPropReg


@pytest.mark.slow
def test_multipropreg_adapter_equals_the_packages_own_forward_on_its_atlas_files(tmp_path):
    pytest.importorskip("MultiPropReg")
    import nibabel as nib

    from equiqc.pipeline.backends.multipropreg import atlas_affine, atlas_paths

    vol_path, _ = atlas_paths()
    fixed_arr = np.asarray(nib.load(str(vol_path)).dataobj, dtype=np.float32)  # the package's own array (LIA)
    shape = fixed_arr.shape
    # a moving image in the same array layout: the atlas shifted by a smooth, non-rigid warp of a few voxels
    y = T.identity_grid(shape, torch.float64)
    bump = torch.exp(-((y - torch.tensor(shape, dtype=torch.float64).view(1, 3, 1, 1, 1) / 2) ** 2).sum(1) / 40.0**2)
    pull = y + torch.stack([3 * bump, -2 * bump, 2 * bump], dim=1)
    moving_arr = T.warp(torch.as_tensor(fixed_arr)[None, None].double(), pull)[0, 0].float().numpy()

    backend = load_backend("multipropreg")
    # the package's own path: min-max normalise both arrays, net(moving, fixed) -> (warped, flow, ...)
    def minmax(a):
        return torch.as_tensor((a - a.min()) / (a.max() - a.min()))[None, None].float()
    with torch.no_grad():
        out = backend.net(minmax(moving_arr), minmax(fixed_arr))
    warped_ref, flow = out[0][0, 0].numpy(), out[1].double()
    # where the package's own SpatialTransformer samples: (grid + flow) normalised by n - 1, read by grid_sample
    # with align_corners=False -> voxel ((g + 1) n - 1) / 2 (written out here from layers.py, not from equiqc)
    n = torch.tensor(shape, dtype=torch.float64).view(1, 3, 1, 1, 1)
    g = 2 * ((T.identity_grid(shape, torch.float64) + flow) / (n - 1) - 0.5)
    ref_map = ((g + 1) * n - 1) / 2
    affine = atlas_affine()
    ref_world = T.voxel_to_mm(ref_map, torch.as_tensor(affine))[0]

    # equiqc's path: the files as a user would have them (true LIA affine), loaded as RAS+ like any input
    save_volume(tmp_path / "fixed.nii.gz", fixed_arr, affine)
    save_volume(tmp_path / "moving.nii.gz", moving_arr, affine)
    src, tgt = load_volume(tmp_path / "moving.nii.gz"), load_volume(tmp_path / "fixed.nii.gz")
    assert src.orientation == ("L", "I", "A")
    phi = backend.register(torch.as_tensor(src.data)[None, None], torch.as_tensor(tgt.data)[None, None],
                           torch.as_tensor(src.affine), torch.as_tensor(tgt.affine))
    ours_world = T.voxel_to_mm(phi.double(), torch.as_tensor(src.affine))[0]  # on the RAS+ target grid
    # the reference onto the RAS+ target grid: the same voxels, reordered (LIA -> RAS+ is an exact permutation)
    ref_on_ras = _lia_to_ras_grid(ref_world)
    brain_lia = torch.as_tensor(fixed_arr > 0.1)
    brain = _lia_to_ras_grid(brain_lia[None])[0]
    gap = (ours_world - ref_on_ras).norm(dim=0)[brain]
    moved = (ref_map - T.identity_grid(shape, torch.float64))[0].norm(dim=0)[brain_lia]
    print(f"MultiPropReg adapter vs net(moving, fixed): median {gap.median():.2e} mm, p95 "
          f"{torch.quantile(gap.float(), 0.95):.2e}, max {gap.max():.2e}; the network moves brain voxels by a median "
          f"{moved.median():.2f} mm (max {moved.max():.2f})")
    assert moved.max() > 1.0  # a real displacement to agree on
    assert gap.median() < 0.05 and torch.quantile(gap.float(), 0.95) < 0.1
    # the package's own warped image (of its min-max-normalised input) = the source warped by equiqc's map
    warped_ours = T.warp(minmax(src.data).double(), phi.double())[0, 0]
    warped_ref = _lia_to_ras_grid(torch.as_tensor(warped_ref)[None].double())[0]
    assert (warped_ours - warped_ref)[brain].abs().median() < 1e-3


def _lia_to_ras_grid(x: torch.Tensor) -> torch.Tensor:
    """``(C, L, I, A)`` -> ``(C, R, A, S)``: the same voxels on the RAS+ grid (flip L and I, swap the last two)."""
    return x.flip(1).flip(2).permute(0, 1, 3, 2)
