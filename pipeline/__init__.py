"""equiqc science: transforms, perturbations, the equivariance uncertainty estimator, backends.

Pure computation on tensors: this package imports neither ``storage`` nor ``workflows``.
"""
