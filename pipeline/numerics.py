"""The version of equiqc's numerics: bump :data:`NUMERICS_VERSION` in any change that alters stored results
(estimator, perturbation sampling, adapters' resampling, summaries).

It is part of every pair's result key (``RunConfig.result_key``), so a resumed run never mixes results
computed by different numerics in one cohort: after an upgrade that bumps it, every pair is recomputed
(or, without ``--overwrite``, the run refuses to mix). A release that changes no numbers keeps it, and
resume keeps working across that upgrade.

History: 1 = the estimator as of the first cohort runs (float32 centred sums merged in float64).
2 = uniGradICON/multiGradICON see the reference's array layout (SAR); MultiPropReg's map is the sampling
positions of the package's own warp (align_corners=False).
3 = one interpolation per sample (affine perturbations folded into the adapter's resampling), images
normalised after resampling onto the network grid (as in training), maps brought back by interpolating the
displacement, float32 sums in voxel units; the diffeomorphic family integrated on a coarse grid; std reported
only where a quarter of the samples (at least 3) are valid; a stochastic model's prediction is its dropout-off
forward. The batch size left the result key (it changes only float rounding).
4 = the diffeomorphic family sampled once too (the source read at ``tau`` of the network grid by adapters with
a ``register_warped`` hook, instead of warped on its own grid and resampled) and composed back from ``tau``'s
coarse displacement (mean std_mm in the brain +0.3 % to +1.4 % on 4 MNI pairs at K = 8; affine families
unchanged).
"""

NUMERICS_VERSION = 4
