"""equiqc orchestration: Dask clusters and graphs, the CLI, the demo."""
