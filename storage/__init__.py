"""equiqc storage: manifests, NIfTI <-> Zarr, result store, reports. Imports ``pipeline`` only for types."""
