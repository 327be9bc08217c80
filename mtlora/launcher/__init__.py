"""Multi-process launch: :mod:`.launch` starts ``accelerate launch`` workers from the Hydra process, and
:mod:`.worker` (``python -m mtlora.launcher.worker <run_dir>``) is the entry each worker runs."""
