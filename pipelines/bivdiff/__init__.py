"""BIVDiff (arXiv 2312.02813): frame-wise image-model generation/editing, Mixed Inversion, VDM temporal smoothing.

`program` is the pure engine part (grids, Mixed Inversion, smoothing over the IV-Mixed engine's moves),
`stage1` the diffusers task pipelines, `inputs` the fsspec video readers, `runner.BIVDiff` one loaded worker,
`python -m pipelines.bivdiff` the single-video CLI. The algorithm: docs/algorithms.md §8.
"""
