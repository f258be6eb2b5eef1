"""Which BIDS library should equiqc use? Start-up time to index a dataset and list its T1w images.

Builds a synthetic dataset of ``--subjects`` subjects (every third with two sessions; tiny T1w and T2w NIfTI
files with JSON sidecars), then times each library in a fresh Python process (import + index + query, what
``equiqc bids`` pays on every call): pybids (``BIDSLayout``, no validation), bids2table (``index_dataset``) and
ancpbids (``BIDSLayout``). The three are not equiqc dependencies (only ancpbids is): run it in a venv with all
three, e.g. ``pip install pybids bids2table ancpbids nibabel``.

    python benchmarks/bids_libraries.py --subjects 300 --dataset /tmp/bids300
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

QUERIES = {
    "pybids": "from bids import BIDSLayout; layout = BIDSLayout(D, validate=False); "
              "rows = layout.get(suffix='T1w', extension=['.nii', '.nii.gz'], return_type='object')",
    "bids2table": "from bids2table import index_dataset; "
                  "rows = [r for r in index_dataset(D).to_pylist() if r['suffix'] == 'T1w']",
    "ancpbids": "import ancpbids; layout = ancpbids.BIDSLayout(D); "
                "rows = layout.get(suffix='T1w', extension=['.nii', '.nii.gz'], return_type='object')",
}


def build(ds: Path, subjects: int) -> None:
    ds.mkdir(parents=True)
    (ds / "dataset_description.json").write_text(json.dumps({"Name": "bench", "BIDSVersion": "1.9.0"}))
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))
    for i in range(subjects):
        for ses in (["01", "02"] if i % 3 == 0 else [None]):
            folder = ds / f"sub-{i:04d}" / (f"ses-{ses}" if ses else "") / "anat"
            folder.mkdir(parents=True, exist_ok=True)
            stem = f"sub-{i:04d}" + (f"_ses-{ses}" if ses else "")
            nib.save(img, str(folder / f"{stem}_T1w.nii.gz"))
            (folder / f"{stem}_T1w.json").write_text(json.dumps({"RepetitionTime": 2.3}))
            nib.save(img, str(folder / f"{stem}_T2w.nii.gz"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, default=300)
    parser.add_argument("--dataset", type=Path, required=True, help="built here unless it exists")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not args.dataset.exists():
        build(args.dataset, args.subjects)
    for name, query in QUERIES.items():
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", f"D = {str(args.dataset)!r}; {query}; print(len(rows))"],
                                 capture_output=True, text=True)
            times.append(time.perf_counter() - start)
            if out.returncode:
                print(name, "failed:", out.stderr.strip().splitlines()[-1])
                break
        else:
            print(json.dumps({"library": name, "images": int(out.stdout.strip()), "seconds_min": round(min(times), 2),
                              "seconds_median": round(sorted(times)[len(times) // 2], 2)}))


if __name__ == "__main__":
    main()
