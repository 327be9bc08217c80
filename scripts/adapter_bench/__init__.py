"""The parts of ``scripts/bench_adapters.py``: layer stacks (:mod:`.stack`), budgets and rank rules
(:mod:`.budget`), time and memory measurement (:mod:`.measure`), the peft comparison (:mod:`.peft_compare`)
and the tables (:mod:`.report`)."""
