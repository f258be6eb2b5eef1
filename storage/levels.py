"""What a run keeps per pair in ``results.zarr``: the storage levels of ``--store`` (one place for the concept).

Measured on a 2 mm MNI demo pair (99 x 117 x 95 voxels; the raw float32 ``std_mm`` volume is 4.4 MB; Blosc
zstd level 1 with byte shuffle, :data:`equiqc.storage.results.COMPRESSOR`; ``benchmarks/storage_levels.py``):

* ``minimal``: ``std_mm`` (float32) and ``n_valid`` (uint16, under 0.01x), plus the per-pair summaries in the
  completion marker and the report: 0.75x the raw volume;
* ``standard`` (default): adds ``prediction_displacement``, the unperturbed prediction as a float16
  displacement in source voxels (1.03x; float16 rounds it by at most 0.002 voxel, 0.004 mm at 2 mm, far
  below any use: export as an ITK transform, report figures; folding is computed before storage, in float32):
  1.79x;
* every level: ``error_mm`` (float32, the calibrated per-voxel error estimate) when the run's calibration
  carries a voxel model (the shipped ``default`` one does), about as large as ``std_mm``;
* ``full``: every array (``covariance_mm2``, ``mean_map``, the exact float32 ``prediction_map``, the
  variance split of stochastic models): for research.
"""

from __future__ import annotations

STORE_LEVELS: dict[str, tuple[str, ...]] = {
    "minimal": ("std_mm", "n_valid", "error_mm"),
    "standard": ("std_mm", "n_valid", "error_mm", "prediction_displacement"),
    "full": ("std_mm", "n_valid", "error_mm", "covariance_mm2", "intrinsic_spread_mm2", "bias_jitter_mm2", "mean_map",
             "prediction_map"),
}
DEFAULT_LEVEL = "standard"
