"""BIDS in, BIDS derivatives out: ``equiqc bids DS OUT participant|group`` on a small dataset built from the MNI
template (three subjects, one with two sessions), indexed back with ancpbids."""

from __future__ import annotations

import json

import ancpbids
import numpy as np
import pandas as pd
import pytest
from cohorts import NEAR_FREE_MODEL, TESTS
from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

from equiqc.storage.bids import BidsError, discover
from equiqc.storage.locks import _conflict, participant_scope
from equiqc.storage.nifti import save_volume
from equiqc.workflows.bids import space_label
from equiqc.workflows.cli import main
from equiqc.workflows.demo import rigidly_moved

IMAGES = {"01": [None], "02": ["01", "02"], "03": [None]}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("bids")
    ds = root / "ds"
    template = load_mni152_template(resolution=4)
    data, affine = np.asarray(template.dataobj, np.float32), template.affine
    tpl = root / "tpl-MNI152NLin2009cAsym_res-04_T1w.nii.gz"
    save_volume(tpl, data, affine)
    mask = np.asarray(load_mni152_brain_mask(resolution=4).dataobj) > 0
    save_volume(root / "tpl-MNI152NLin2009cAsym_res-04_desc-brain_mask.nii.gz", mask.astype(np.uint8), affine)
    (ds).mkdir()
    (ds / "dataset_description.json").write_text(json.dumps({"Name": "tiny", "BIDSVersion": "1.9.0"}))
    for i, (sub, sessions) in enumerate(IMAGES.items()):
        for j, ses in enumerate(sessions):
            folder = ds / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "anat"
            folder.mkdir(parents=True)
            moved, _ = rigidly_moved(data, affine, degrees=(1.0 + i, -1.0 - j, 2.0), shift_mm=(2.0, -1.0 * j, 1.0))
            stem = f"sub-{sub}" + (f"_ses-{ses}" if ses else "")
            save_volume(folder / f"{stem}_T1w.nii.gz", moved, affine)
            save_volume(folder / f"{stem}_T2w.nii.gz", moved, affine)  # not the suffix asked for: ignored
    # another pipeline's derivatives inside the dataset: their T1w images are not raw data
    prep = ds / "derivatives" / "fmriprep"
    (prep / "sub-01" / "anat").mkdir(parents=True)
    (prep / "dataset_description.json").write_text(json.dumps({"Name": "prep", "BIDSVersion": "1.9.0",
                                                               "DatasetType": "derivative"}))
    save_volume(prep / "sub-01" / "anat" / "sub-01_desc-preproc_T1w.nii.gz", data, affine)
    return ds, tpl, root / "tpl-MNI152NLin2009cAsym_res-04_desc-brain_mask.nii.gz"


def test_discovery_sessions_labels_and_clear_errors(dataset, tmp_path):
    ds, *_ = dataset
    images = discover(ds)
    assert [i.stem for i in images] == ["sub-01", "sub-02_ses-01", "sub-02_ses-02", "sub-03"]
    assert [i.session for i in discover(ds, ["sub-02"])] == ["01", "02"]
    assert [i.stem for i in discover(ds, session_labels=["ses-02"])] == ["sub-02_ses-02"]
    with pytest.raises(BidsError, match="participant '09' has no anat"):
        discover(ds, ["09"])
    (tmp_path / "x").mkdir()
    with pytest.raises(BidsError, match="not a BIDS dataset \\(no dataset_description.json\\)"):
        discover(tmp_path / "x")
    with pytest.raises(BidsError, match="no anat/\\*_FLAIR.nii\\[.gz\\] image matches"):
        discover(ds, suffix="FLAIR")
    assert space_label("tpl-MNI152NLin2009cAsym_res-04_T1w.nii.gz") == "MNI152NLin2009cAsym"
    assert space_label("/a/MNI152_T1_2mm.nii.gz") == "MNI152T12mm"


def test_participant_leases_run_side_by_side_but_not_with_the_whole_cohort():
    a, b = participant_scope("sub-01"), participant_scope("sub-02")
    assert not _conflict(a, b) and _conflict(a, a) and _conflict(a, "all") and _conflict(a, "shard-1-of-4")


@pytest.mark.slow
def test_bids_app_participant_then_group_is_a_derivative_dataset(dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    ds, tpl, mask = dataset
    out = tmp_path / "derivatives" / "equiqc"
    options = ["--model", NEAR_FREE_MODEL, "--samples", "2", "--batch-size", "2", "--workers", "1"]
    assert main(["bids", str(ds), str(out), "participant", "--target", str(tpl), "--target-mask", str(mask),
                 "--participant-label", "01", "sub-02", *options]) == 0
    assert "participant level done" in capsys.readouterr().out
    assert not (out / "decisions.tsv").exists()  # the group level decides
    # no labels: the whole dataset (sub-03 is left to compute) under one lease, with the cohort decision
    assert main(["bids", str(ds), str(out), "participant", "--target", str(tpl), "--target-mask", str(mask),
                 *options]) == 0
    assert "1 computed this run" in capsys.readouterr().out and (out / "decisions.tsv").exists()
    assert main(["bids", str(ds), str(out), "group"]) == 0
    layout = ancpbids.BIDSLayout(str(out))
    description = layout.get_dataset_description()
    assert description["DatasetType"] == "derivative"
    generated = json.loads((out / "dataset_description.json").read_text())["GeneratedBy"][0]
    assert generated["Name"] == "equiqc" and "K=2" in generated["Description"]
    maps = layout.get(desc="uncertainty", extension=".nii.gz", return_type="filename")
    assert len(maps) == 4 and all("space-MNI152NLin2009cAsym" in m for m in maps)
    xfms = layout.get(suffix="xfm", extension=".nii.gz", return_type="filename")
    assert len(xfms) == 4 and any("sub-02/ses-02/anat/sub-02_ses-02_from-T1w_to-MNI152NLin2009cAsym" in x
                                  for x in xfms)
    sidecar = json.loads((out / "sub-01" / "anat" /
                          "sub-01_space-MNI152NLin2009cAsym_desc-uncertainty_stdmm.json").read_text())
    assert sidecar["Units"] == "mm" and sidecar["Samples"] == 2 and sidecar["Sources"] == [
        "bids:raw:sub-01/anat/sub-01_T1w.nii.gz"] and sidecar["Model"] == NEAR_FREE_MODEL
    decisions = pd.read_csv(out / "decisions.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert list(decisions["pair_id"]) == ["sub-01", "sub-02_ses-01", "sub-02_ses-02", "sub-03"]
    assert list(decisions["session"]) == ["n/a", "01", "02", "n/a"]  # sessions are separate rows
    assert (out / "exclude.tsv").exists() and (out / "report.html").exists()
    assert json.loads((out / "decisions.json").read_text())["expected_error_mm"]["Units"] == "mm"
    # the export option of manifest mode: the same derivatives layout from any run folder (entities from file names)
    assert main(["export", str(out), "--all", "--layout", "bids", "--to", str(tmp_path / "exported")]) == 0
    exported = ancpbids.BIDSLayout(str(tmp_path / "exported"))
    assert exported.get_dataset_description()["DatasetType"] == "derivative"
    assert len(exported.get(desc="uncertainty", extension=".nii.gz", return_type="filename")) == 4
    assert (tmp_path / "exported" / "sub-02" / "ses-01" / "anat" /
            "sub-02_ses-01_from-T1w_to-MNI152NLin2009cAsym_mode-image_xfm.json").is_file()
    assert main(["bids", str(ds), str(out), "participant", "--target", str(tpl), "--participant-label", "01",
                 "--shard", "1/2", *options]) == 2
    assert "not both" in capsys.readouterr().err
    # not BIDS: one clear message, exit 2
    (tmp_path / "plain").mkdir()
    assert main(["bids", str(tmp_path / "plain"), str(tmp_path / "o"), "participant", "--target", str(tpl)]) == 2
    assert "not a BIDS dataset" in capsys.readouterr().err
    assert main(["bids", str(ds), str(tmp_path / "o2"), "group"]) == 2
    assert "run `equiqc bids" in capsys.readouterr().err
