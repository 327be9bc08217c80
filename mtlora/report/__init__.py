"""Paper tables from finished run dirs: ``tables`` (collect, aggregate over seeds, markdown / CSV / LaTeX
beside the papers' numbers in docs/paper_numbers.yaml) and ``plots`` (rank / lambda curves, per-task bars).
Driven by scripts/make_tables.py."""
