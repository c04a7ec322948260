"""The report's parts: reading its inputs, building its tables, drawing its figures.

The report stage (`vmddpm.stages.report`) composes them: `inputs` reads the files the pipeline wrote
(metrics.json, ddim_sweep.json, samples, the paper's reference numbers, the scaling benchmark) and the
MLflow store; `tables` turns them into rows, CSV, Markdown and the summary (no I/O); `figures` draws
them (`vmddpm.plotting`).
"""
