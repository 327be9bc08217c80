"""Paper tables from finished run dirs: ``tables`` (collect, aggregate over seeds, markdown / CSV / LaTeX
beside the papers' numbers in docs/paper_numbers.yaml) and ``metric_plots`` (rank / lambda / heads curves, per-task
bars), driven by scripts/make_tables.py; ``run_table`` (``make table-<paper>-<table>``: every cell of a table,
then its report) and ``sweeps`` (the check that a sweep preset's keys act on the selected config)."""
