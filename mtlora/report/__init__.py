"""Paper tables from finished run dirs: ``run_dirs`` (read each run's config, status and metrics),
``aggregate`` (the papers' numbers from docs/paper_numbers.yaml, runs grouped over seeds into a table or a
summary), ``render`` (markdown / CSV / LaTeX) and ``metric_plots`` (rank / lambda / heads curves, per-task
bars), driven by scripts/make_tables.py; ``run_table`` (``make table-<paper>-<table>``: every cell of a table,
then its report) and ``sweeps`` (the check that a sweep preset's keys act on the selected config)."""
