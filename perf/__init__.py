"""chorus's benchmark harness (issue 6): `python -m perf.bench` runs every comparison against real tritonservers,
`python -m perf.report` draws the plots and the markdown summary of a results folder, `python -m perf.summarize`
keeps perf/results/summary.json and the README's results table current. Run from the repository root."""
