"""Part 1 of 6, the bottom layer: the workspace trace contract and its I/O (WORKSPACE.md).

`contract` (RunTrace, read_run / write_run, TraceError), `fit_params` (fits/<name>/),
`atomic_io` (atomic writes, never pickle), `importers` (long-format CSV/JSONL/Parquet),
`faults` (fault injection for the reliability tests). Imports nothing else of the package.
"""
