"""The ``finetune`` procedure: gradient fine-tuning as a recipe (:mod:`.recipe`) whose optimizer step is a
strategy (:mod:`.steps`); the log sums it keeps are in :mod:`.records`."""
