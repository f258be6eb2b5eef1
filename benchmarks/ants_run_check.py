"""After ``equiqc run --model ants``: does each pair's stored prediction reproduce antspyx's own registration?

For every complete pair of a run folder whose registration ANTs made (no ``transform`` column), antspyx registers
the pair's source to its target itself (same preset, seed 1, one ITK thread) and its warped source is compared with
the source warped by equiqc's stored ``prediction_map`` (correlation over the target mask, else the whole grid). For
pairs given a transform file, the stored prediction is compared with the file read again (max distance, mm).

    python benchmarks/ants_run_check.py /tmp/ants-cli/qc
"""

from __future__ import annotations

import argparse
import json
import os

os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "1"  # before antspyx's first registration, as the backend

import ants  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from equiqc.pipeline import transforms as T  # noqa: E402
from equiqc.pipeline.backends.ants import DEFAULT_PRESET, _image  # noqa: E402
from equiqc.pipeline.scores import map_error_mm  # noqa: E402
from equiqc.storage.cohort import read_pair  # noqa: E402
from equiqc.storage.manifest import read_manifest  # noqa: E402
from equiqc.storage.nifti import load_volume  # noqa: E402
from equiqc.storage.results import read_array  # noqa: E402
from equiqc.storage.run_folder import cohort_store, read_run_record, results_store  # noqa: E402
from equiqc.storage.transform_files import read_transform_map  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    args = p.parse_args()
    record = read_run_record(args.run_dir)
    preset = record["config"]["model_options"].get("preset", DEFAULT_PRESET)
    specs = {s.pair_id: s for s in read_manifest(record["manifest"])}
    report = pd.read_parquet(f"{args.run_dir}/report.parquet")
    for pair_id in report[report.status == "complete"].pair_id:
        stored = read_pair(cohort_store(args.run_dir), pair_id)
        src, tgt = stored["source"], stored["target"]
        phi = read_array(results_store(args.run_dir), pair_id, "prediction_map")[0]
        spec = specs[pair_id]
        if spec.path("transform") is not None:
            given = read_transform_map(spec.path("transform"), load_volume(spec.source), load_volume(spec.target))
            line = {"pair_id": pair_id, "given_transform": True,
                    "stored_vs_file_max_mm": float(map_error_mm(phi, given, src.affine).max())}
        else:
            os.environ["ANTS_RANDOM_SEED"] = "1"
            reg = ants.registration(_image(ants, tgt.data, tgt.affine), _image(ants, src.data, src.affine), preset)
            warped = T.warp(torch.as_tensor(src.data)[None, None], torch.as_tensor(phi)[None].float())[0, 0].numpy()
            region = stored["target_mask"].data > 0 if "target_mask" in stored else np.ones(tgt.data.shape, bool)
            corr = np.corrcoef(warped[region], reg["warpedmovout"].numpy()[region])[0, 1]
            line = {"pair_id": pair_id, "given_transform": False, "warped_source_correlation": float(corr)}
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
