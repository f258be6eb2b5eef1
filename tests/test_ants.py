"""The ANTs backend through the real antspyx (seconds at 4 mm), and transform files as a pair's prediction.

Checked against ANTs itself: the map the backend returns warps the source exactly as ANTs' own warped image, also
when the source's header is oblique or flipped and when a rigid perturbation is handed to ANTs as a header change;
seeded registrations are bit-identical; fMRIPrep's parameter sets become the antsRegistration arguments of their
published values; transform files (composite .h5, affine .mat, displacement NIfTI) read back as ANTs applies them.
"""

from __future__ import annotations

import json
import os
import tempfile

# ITK (inside antspyx) reads its thread count once, at its first use in the process: antspyx's own registrations
# here must run one thread, as the backend's do, to be comparable bit for bit
os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "1"

import ants  # noqa: E402
import numpy as np
import pytest
import torch

from equiqc.pipeline import transforms as T
from equiqc.pipeline import world as W
from equiqc.pipeline.backends import ants_presets
from equiqc.pipeline.backends.ants import AntsRegistration, _image
from equiqc.pipeline.backends.base import PreparedPair, register_perturbed
from equiqc.pipeline.backends.registry import load_backend
from equiqc.pipeline.estimator import EstimatorConfig, estimate_uncertainty
from equiqc.pipeline.perturbations import PerturbationConfig, sample_perturbations
from equiqc.pipeline.scores import map_error_mm
from equiqc.storage.displacement import write_displacement_field
from equiqc.storage.nifti import Volume, VolumeError, save_volume
from equiqc.storage.transform_files import read_transform_map


def _ants_warped(source, source_affine, target, target_affine, **registration) -> tuple[np.ndarray, dict]:
    """ANTs' own registration of the arrays (seed 1) and its warped source."""
    os.environ["ANTS_RANDOM_SEED"] = "1"
    reg = ants.registration(_image(ants, target, target_affine), _image(ants, source, source_affine), **registration)
    return reg["warpedmovout"].numpy(), reg


def _warp(source: np.ndarray, phi: np.ndarray) -> np.ndarray:
    return T.warp(torch.as_tensor(source)[None, None], torch.as_tensor(phi)[None].float())[0, 0].numpy()


def _corr(a, b, region) -> float:
    return float(np.corrcoef(a[region], b[region])[0, 1])


def test_map_warps_the_source_as_ants_does_on_flipped_and_oblique_headers(mni_pair_4mm):
    src, tgt, affine, truth, brain = mni_pair_4mm
    backend = AntsRegistration()
    phi = backend.register_arrays(src, affine, tgt, affine)
    warped, _ = _ants_warped(src, affine, tgt, affine, type_of_transform="SyN")
    assert _corr(_warp(src, phi), warped, brain) > 0.999
    assert float(map_error_mm(phi, truth, affine)[brain].mean()) < 1.0  # ANTs registered the rigid move
    # the same anatomy stored left-right flipped (LAS array, its header says so) and with an oblique header
    flip = affine @ np.array([[-1, 0, 0, src.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    c, s = np.cos(0.2), np.sin(0.2)
    oblique = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]) @ affine
    for source, source_affine in ((src[::-1].copy(), flip), (src, oblique)):
        phi = backend.register_arrays(source, source_affine, tgt, affine)
        warped, _ = _ants_warped(source, source_affine, tgt, affine, type_of_transform="SyN")
        assert _corr(_warp(source, phi), warped, brain) > 0.999
    assert "antsRegistration" in backend.console[-1] or "Stage" in backend.console[-1]  # ANTs' output, captured


def test_seeded_runs_are_bit_identical_and_unseeded_is_stochastic(mni_pair_4mm, tmp_path, monkeypatch):
    src, tgt, affine, *_ = mni_pair_4mm
    seeded = AntsRegistration(preset="SyN")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # this test's own temporary folder
    first = seeded.register_arrays(src, affine, tgt, affine)
    assert not list(tmp_path.iterdir())  # ANTs' transform files and console capture removed
    assert np.array_equal(first, seeded.register_arrays(src, affine, tgt, affine))
    unseeded = AntsRegistration(seed=None)
    assert unseeded.stochastic and not seeded.stochastic
    with unseeded.deterministic():  # its prediction: the seeded run
        assert np.array_equal(first, unseeded.register_arrays(src, affine, tgt, affine))
    # unseeded, two draws per perturbation: ANTs' own run-to-run scatter is the intrinsic part of the spread
    config = EstimatorConfig(samples=2, draws=2, batch_size=2, perturbation=PerturbationConfig(kind="rigid"))
    split = estimate_uncertainty(unseeded, src, tgt, affine, affine, config, seed=0)
    assert split.intrinsic_spread_mm2 is not None and np.nanmax(split.intrinsic_spread_mm2[0]) > 0
    np.testing.assert_array_equal(split.prediction_map, first.astype(np.float32))
    assert os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] == "1"


def test_rigid_perturbation_reaches_ants_as_a_header_change(mni_pair_4mm):
    """psi = T o R(A o T, B) for a rigid T given to ANTs as the header A T^-1: warping the *unperturbed* source with
    psi reproduces ANTs' own warped image of that header-perturbed source (no resampling anywhere); the identity
    perturbation is the plain registration."""
    src, tgt, affine, _, brain = mni_pair_4mm
    backend = AntsRegistration()
    a = torch.as_tensor(affine)
    matrices = sample_perturbations(PerturbationConfig(kind="rigid"), 1, src.shape, a, seed=3).matrices
    matrices = torch.cat([matrices, torch.eye(4, dtype=matrices.dtype)[None]])
    pair = PreparedPair(torch.as_tensor(src)[None, None], torch.as_tensor(tgt)[None, None], a, a)
    psi = register_perturbed(backend, pair, matrices).numpy()
    header = affine @ np.linalg.inv(matrices[0].numpy())
    warped, _ = _ants_warped(src, header, tgt, affine, type_of_transform="SyN")
    assert _corr(_warp(src, psi[0]), warped, brain) > 0.999
    np.testing.assert_allclose(psi[1], backend.register_arrays(src, affine, tgt, affine), atol=1e-4)
    # a non-rigid perturbation cannot be a header: the source is resampled (the map is still composed back)
    scale = torch.diag(torch.tensor([1.05, 1.0, 1.0, 1.0], dtype=torch.float64))[None]
    assert np.isfinite(register_perturbed(backend, pair, scale).numpy()).all()


def test_estimator_with_ants_and_a_given_prediction(mni_pair_4mm):
    src, tgt, affine, truth, brain = mni_pair_4mm
    backend = load_backend("ants")
    config = EstimatorConfig(samples=3, batch_size=1, perturbation=PerturbationConfig(kind="rigid"))
    result = estimate_uncertainty(backend, src, tgt, affine, affine, config, seed=0)
    assert not result.prediction_given and np.isfinite(result.std_mm[brain]).all()
    assert float(np.nanmean(result.std_mm[brain])) < 1.0  # ANTs lands in the same place in every frame
    given = estimate_uncertainty(backend, src, tgt, affine, affine, config, seed=0, prediction=truth)
    assert given.prediction_given and np.array_equal(given.prediction_map, truth.astype(np.float32))
    np.testing.assert_array_equal(given.std_mm, result.std_mm)  # the same K perturbed registrations
    with pytest.raises(ValueError, match="given prediction has shape"):
        estimate_uncertainty(backend, src, tgt, affine, affine, config, prediction=truth[:, :-1])


def test_fmriprep_parameter_sets_become_the_published_antsregistration_arguments(tmp_path):
    args = ants_presets.registration_arguments(ants_presets.FMRIPREP, "F", "M", "out_", None, 7)
    text = " ".join(args)
    for expected in ("--transform Rigid[0.05]", "--metric Mattes[F,M,1,56,Regular,0.25]",
                     "--convergence [100x100,1e-06,20]", "--shrink-factors 2x1", "--smoothing-sigmas 2x1vox",
                     "--transform Affine[0.08]", "--smoothing-sigmas 1x0vox", "--transform SyN[0.1,3.0,0.0]",
                     "--metric CC[F,M,1,4,None,1.0]", "--convergence [100x70x50x20,1e-06,10]",
                     "--shrink-factors 8x4x2x1", "--smoothing-sigmas 3x2x1x0vox", "--use-histogram-matching 1",
                     "--winsorize-image-intensities [0.005,0.995]", "--initial-moving-transform [F,M,1]",
                     "--random-seed 7"):
        assert expected in text, expected
    assert text.count("--transform") == 3
    sloppy = " ".join(ants_presets.registration_arguments(ants_presets.FMRIPREP_SLOPPY, "F", "M", "o", "init.mat",
                                                          None))
    assert "--transform SyN" not in sloppy and "--initial-moving-transform init.mat" in sloppy
    assert "--random-seed" not in sloppy and "--metric Mattes[F,M,1,56,Random,0.2]" in sloppy
    # a user's parameter file (nipype Registration keys), checked
    good = tmp_path / "params.json"
    good.write_text(json.dumps({**ants_presets.FMRIPREP_SLOPPY, "output_transform_prefix": "x"}))
    assert ants_presets.read_parameter_file(good)["transforms"] == ["Rigid", "Affine"]
    for bad, message in (({"transforms": ["Rigid"]}, "missing 'transform_parameters'"),
                         ({**ants_presets.FMRIPREP, "metric": ["CC"]}, "'metric' needs one entry per stage"),
                         ({**ants_presets.FMRIPREP, "typo": 1}, "unknown key 'typo'")):
        good.write_text(json.dumps(bad))
        with pytest.raises(ants_presets.ParameterError, match=message):
            ants_presets.read_parameter_file(good)
    good.write_text("{not json")
    with pytest.raises(ants_presets.ParameterError, match="not valid JSON"):
        ants_presets.read_parameter_file(good)


def test_a_parameter_set_registers_with_its_preprocessing(mni_pair_4mm, tmp_path):
    """fMRIPrep's --sloppy set (truncation, affine initializer search, Rigid + Affine) registers the rigid move;
    the same set from a file gives the same map."""
    src, tgt, affine, truth, brain = mni_pair_4mm
    phi = AntsRegistration(preset="fmriprep-sloppy").register_arrays(src, affine, tgt, affine)
    assert float(map_error_mm(phi, truth, affine)[brain].mean()) < 1.0
    path = tmp_path / "sloppy.yaml"
    path.write_text(json.dumps(ants_presets.FMRIPREP_SLOPPY))  # JSON is YAML
    from_file = AntsRegistration(parameters=str(path)).register_arrays(src, affine, tgt, affine)
    np.testing.assert_array_equal(phi, from_file)


def test_bad_model_options_are_refused_up_front():
    for options, message in (({"weights": "w.pt"}, "takes no --weights"), ({"mc_dropout": True}, "no dropout"),
                             ({"preset": "SyNN"}, "unknown preset 'SyNN'"), ({"seed": -1}, "seed must be"),
                             ({"threads": 0}, "threads must be"), ({"radius": 4}, "unknown model option 'radius'"),
                             ({"parameters": "/nonexistent.json"}, "not found")):
        with pytest.raises(ValueError, match=message):
            load_backend("ants", **options)


def test_a_bad_ants_option_stops_the_command_before_any_work(tmp_path, capsys):
    from equiqc.workflows.cli import main

    assert main(["estimate", str(tmp_path / "s.nii.gz"), str(tmp_path / "t.nii.gz"), "--model", "ants",
                 "--ants-preset", "SyNN"]) == 2
    assert "unknown preset 'SyNN'" in capsys.readouterr().err
    assert main(["estimate", "s.nii.gz", "t.nii.gz", "--model", "ants", "--ants-seed", "one"]) == 2
    assert "--ants-seed: 'one' is not an integer" in capsys.readouterr().err
    params = tmp_path / "params.json"
    params.write_text(json.dumps(ants_presets.FMRIPREP_SLOPPY))
    backend = load_backend("ants", parameters=str(params))
    assert backend.weights_path == str(params)  # its sha256 keys the run's results, like a model's weights


# -- transform files --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def written_transforms(mni_pair_4mm, tmp_path_factory):
    """antspyx's SyN (composite .h5 and its affine .mat) and the dense field ANTs itself composes from them."""
    src, tgt, affine, *_ = mni_pair_4mm
    folder = tmp_path_factory.mktemp("xfm")
    _, reg = _ants_warped(src, affine, tgt, affine, type_of_transform="SyN", outprefix=str(folder / "syn_"),
                          write_composite_transform=True)
    _, affine_only = _ants_warped(src, affine, tgt, affine, type_of_transform="Affine",
                                  outprefix=str(folder / "aff_"))
    fix, mov = _image(ants, tgt, affine), _image(ants, src, affine)
    dense = {}
    for name, files in (("h5", [reg["fwdtransforms"]]), ("mat", affine_only["fwdtransforms"])):
        field = ants.image_read(ants.apply_transforms(fix, mov, files, compose=str(folder / f"{name}_"))).numpy()
        dense[name] = W.map_from_displacement_lps(np.moveaxis(field.astype(np.float64), -1, 0), affine, affine)
    return {"h5": reg["fwdtransforms"], "mat": affine_only["fwdtransforms"][0]}, dense, folder


def _volume(data: np.ndarray, affine: np.ndarray) -> Volume:
    return Volume(data, affine, affine, data.shape, ("R", "A", "S"))


def test_transform_files_read_as_ants_applies_them(mni_pair_4mm, written_transforms):
    src, tgt, affine, *_ = mni_pair_4mm
    files, dense, folder = written_transforms
    source, target = _volume(src, affine), _volume(tgt, affine)
    for kind in ("h5", "mat"):
        psi = read_transform_map(files[kind], source, target)
        assert float(map_error_mm(psi, dense[kind], affine).max()) < 0.01  # mm
    # equiqc's own exported field (5D NIfTI, LPS) reads back as the map it was written from
    psi = read_transform_map(files["h5"], source, target)
    nii = folder / "field.nii.gz"
    write_displacement_field(nii, np.moveaxis(W.displacement_lps(psi.astype(np.float64), affine, affine), 0, -1),
                             affine)
    assert float(map_error_mm(read_transform_map(nii, source, target), psi, affine).max()) < 1e-3


def test_bad_transform_files_name_the_file_and_the_fix(mni_pair_4mm, written_transforms, tmp_path):
    src, tgt, affine, *_ = mni_pair_4mm
    files, _, _ = written_transforms
    source, target = _volume(src, affine), _volume(tgt, affine)
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not an hdf5 file")
    with pytest.raises(VolumeError, match="garbage.h5: cannot be read as an ITK/ANTs transform"):
        read_transform_map(garbage, source, target)
    with pytest.raises(VolumeError, match="not a transform file"):
        read_transform_map(tmp_path / "xfm.json", source, target)
    far = _volume(src, affine @ np.array([[1, 0, 0, 500], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float))
    with pytest.raises(VolumeError, match="maps only 0 % of the target into the source image"):
        read_transform_map(files["mat"], far, target)
    small = tmp_path / "small_field.nii.gz"
    write_displacement_field(small, np.zeros((5, 5, 5, 3)), affine)
    with pytest.raises(VolumeError, match="covers 0 % of the target's field of view"):
        read_transform_map(small, source, target)
    not_a_field = tmp_path / "image.nii.gz"
    save_volume(not_a_field, src, affine)
    with pytest.raises(VolumeError, match="image.nii.gz"):
        read_transform_map(not_a_field, source, target)


# -- end to end: equiqc run and equiqc fmriprep on a local Dask cluster -----------------------------------------


def _moved_subjects(tmp_path, count: int):
    """``count`` rigidly moved copies of the 4 mm MNI template (NIfTI), the template and its mask, and each
    subject's ANTs SyN transform to the template as a composite .h5 (what a pipeline leaves behind)."""
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

    from equiqc.workflows.demo import rigidly_moved

    tpl = load_mni152_template(resolution=4)
    data, affine = np.asarray(tpl.dataobj, np.float32), np.asarray(tpl.affine, float)
    mask = (np.asarray(load_mni152_brain_mask(resolution=4).dataobj) > 0).astype(np.uint8)
    subjects = []
    for i in range(count):
        moved, _ = rigidly_moved(data, affine, degrees=(2.0 + 4 * i, -1.0 - 3 * i, 1.5),
                                 shift_mm=(2.0, -1.0 - 4 * i, 1.0))
        _, reg = _ants_warped(moved, affine, data, affine, type_of_transform="SyN",
                              outprefix=str(tmp_path / f"s{i}_"), write_composite_transform=True)
        subjects.append((moved, reg["fwdtransforms"]))
    return data, affine, mask, subjects


@pytest.mark.slow
def test_run_ants_cohort_with_given_transforms(tmp_path, capsys):
    """``equiqc run --model ants`` on a real local cluster: a pair with its own transform file (stored as the
    prediction, within 0.01 mm; deviation small), one given another subject's (flagged 'deviation'), one without
    (ANTs' own registration, reproducing antspyx's warped image), one with a corrupt file (that pair fails with the
    file's name; the rest complete); ANTs' console output in DIR/logs."""
    import pandas as pd

    from equiqc.storage.results import read_array
    from equiqc.workflows.cli import main

    data, affine, mask, subjects = _moved_subjects(tmp_path, 2)
    save_volume(tmp_path / "tpl.nii.gz", data, affine)
    save_volume(tmp_path / "mask.nii.gz", mask, affine)
    for i, (moved, _) in enumerate(subjects):
        save_volume(tmp_path / f"sub-{i}.nii.gz", moved, affine)
    (tmp_path / "bad.h5").write_bytes(b"truncated")
    rows = ["subject_id,pair_id,source,target,target_mask,transform",
            f"sub-0,own,sub-0.nii.gz,tpl.nii.gz,mask.nii.gz,{subjects[0][1]}",
            f"sub-0,other,sub-0.nii.gz,tpl.nii.gz,mask.nii.gz,{subjects[1][1]}",
            "sub-1,none,sub-1.nii.gz,tpl.nii.gz,mask.nii.gz,",
            "sub-1,corrupt,sub-1.nii.gz,tpl.nii.gz,mask.nii.gz,bad.h5"]
    (tmp_path / "cohort.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "qc"
    assert main(["run", str(tmp_path / "cohort.csv"), "--out", str(out), "--model", "ants", "--samples", "2",
                 "--workers", "2", "--store", "full"]) == 0
    report = pd.read_parquet(out / "report.parquet").set_index("pair_id")
    assert report.loc["corrupt", "status"] == "failed" and "bad.h5: cannot be read" in report.loc["corrupt", "error"]
    assert (report.drop("corrupt")["status"] == "complete").all()
    assert report.loc["own", "perturbation"] == "rigid" and report.loc["own", "n_samples"] == 2  # the model's default
    own = read_array(out / "results.zarr", "own", "prediction_map")[0]
    target, source = _volume(data, affine), _volume(subjects[0][0], affine)
    expected = read_transform_map(subjects[0][1], source, target)
    assert float(map_error_mm(own, expected, affine).max()) < 0.01
    own_p95, other_p95 = report.loc[["own", "other"], "transform_deviation_p95_mm"]
    assert own_p95 < 1.5 * report.loc["own", "uncertainty_p95_mm"] and other_p95 > 3 * own_p95  # within its spread
    assert "deviation" not in report.loc["own", "flag_reasons"] and "deviation" in report.loc["other", "flag_reasons"]
    assert np.isnan(report.loc["none", "transform_deviation_p95_mm"])
    none = read_array(out / "results.zarr", "none", "prediction_map")[0]
    warped, _ = _ants_warped(subjects[1][0], affine, data, affine, type_of_transform="SyN")
    assert _corr(_warp(subjects[1][0], none), warped, mask > 0) > 0.999  # antspyx's own result, same seed
    assert "transform_deviation_p95_mm" in (out / "decisions.tsv").read_text()
    assert ">transform_deviation_p95_mm</th>" in (out / "report.html").read_text()  # shown: a pair has one
    assert len((out / "logs" / "own.log").read_text()) > 1000  # ANTs' console output, not on the terminal
    assert "Stage" not in capsys.readouterr().out


def _fmriprep_folder(tmp_path):
    """An fMRIPrep-shaped derivatives folder (sub-01; sub-02 with a session; sub-03 without its transform) and a
    local TemplateFlow folder with the template."""
    data, affine, mask, subjects = _moved_subjects(tmp_path, 2)
    root = tmp_path / "fmriprep"
    root.mkdir()
    (root / "dataset_description.json").write_text(json.dumps({"Name": "fMRIPrep outputs", "BIDSVersion": "1.9.0",
                                                               "DatasetType": "derivative"}))
    for stem, folder, (moved, xfm) in (("sub-01", "sub-01/anat", subjects[0]),
                                       ("sub-02_ses-1", "sub-02/ses-1/anat", subjects[1]),
                                       ("sub-03", "sub-03/anat", subjects[0])):
        (root / folder).mkdir(parents=True)
        save_volume(root / folder / f"{stem}_desc-preproc_T1w.nii.gz", moved, affine)
        save_volume(root / folder / f"{stem}_desc-brain_mask.nii.gz", (moved > 0.2 * moved.max()).astype(np.uint8),
                    affine)
        if stem != "sub-03":
            (root / folder / f"{stem}_from-T1w_to-MNI152NLin2009cAsym_mode-image_xfm.h5").write_bytes(
                open(xfm, "rb").read())
    templates = tmp_path / "templateflow" / "tpl-MNI152NLin2009cAsym"
    templates.mkdir(parents=True)
    save_volume(templates / "tpl-MNI152NLin2009cAsym_res-02_T1w.nii.gz", data, affine)
    save_volume(templates / "tpl-MNI152NLin2009cAsym_res-02_desc-brain_mask.nii.gz", mask, affine)
    return root


@pytest.mark.slow
def test_fmriprep_app_participant_and_group(tmp_path, monkeypatch, capsys):
    import pandas as pd

    from equiqc.workflows.cli import main

    root = _fmriprep_folder(tmp_path)
    out = tmp_path / "qc"
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path / "nothing-here"))
    assert main(["fmriprep", str(root), str(out), "participant"]) == 2
    err = capsys.readouterr().err
    assert "no tpl-MNI152NLin2009cAsym_res-02_T1w.nii.gz" in err and "pass --target" in err
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path / "templateflow"))
    options = ["--sloppy", "--samples", "2", "--workers", "2"]
    assert main(["fmriprep", str(root), str(out), "participant", "--participant-label", "01", *options]) == 0
    assert main(["fmriprep", str(root), str(out), "participant", *options]) == 0
    assert main(["fmriprep", str(root), str(out), "group"]) == 0
    report = pd.read_parquet(out / "report.parquet").set_index("pair_id")
    assert list(report.index) == ["sub-01", "sub-02_ses-1", "sub-03"]
    assert report.loc["sub-03", "status"] == "failed"
    assert "sub-03_from-T1w_to-MNI152NLin2009cAsym_mode-image_xfm.h5: file not found" in report.loc["sub-03", "error"]
    done = report.drop("sub-03")
    assert (done["status"] == "complete").all() and (done["model"] == "ants").all()
    assert done["transform_deviation_p95_mm"].notna().all()
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["model_options"] == {"preset": "fmriprep-sloppy"}
    assert (out / "sub-02" / "ses-1" / "anat" /
            "sub-02_ses-1_space-MNI152NLin2009cAsym_desc-uncertainty_stdmm.nii.gz").is_file()
    decisions = pd.read_csv(out / "decisions.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert list(decisions["session"]) == ["n/a", "1", "n/a"]
    assert (out / "report.html").is_file() and (out / "exclude.tsv").is_file()


def test_fmriprep_discovery_sessions_labels_and_missing_files(tmp_path):
    from equiqc.storage.bids import BidsError
    from equiqc.storage.fmriprep import discover_fmriprep

    (tmp_path / "dataset_description.json").write_text(json.dumps({"Name": "x", "BIDSVersion": "1.9.0"}))
    for folder, stem in (("sub-01/anat", "sub-01"), ("sub-02/ses-1/anat", "sub-02_ses-1")):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / f"{stem}_desc-preproc_T1w.nii.gz").write_bytes(b"")
    (tmp_path / "sub-01/anat/sub-01_from-T1w_to-MNI152NLin2009cAsym_mode-image_xfm.h5").write_bytes(b"")
    (tmp_path / "sub-03").mkdir()  # a subject fMRIPrep wrote no anatomy for
    found = discover_fmriprep(tmp_path)
    assert [(a.stem, a.image.entities) for a in found] == [("sub-01", {"sub": "01"}),
                                                          ("sub-02_ses-1", {"sub": "02", "ses": "1"}),
                                                          ("sub-03", {"sub": "03"})]
    assert [len(a.missing) for a in found] == [0, 1, 2]  # sub-02: its xfm; sub-03: its T1w and xfm
    assert "sub-02_ses-1_from-T1w_to-MNI152NLin2009cAsym_mode-image_xfm.h5" in found[1].missing[0]
    assert [a.stem for a in discover_fmriprep(tmp_path, participant_labels=["sub-02"])] == ["sub-02_ses-1"]
    with pytest.raises(BidsError, match="participant '09' has no folder"):
        discover_fmriprep(tmp_path, participant_labels=["09"])
    with pytest.raises(BidsError, match="letters and digits"):
        discover_fmriprep(tmp_path, space="MNI/../x")
