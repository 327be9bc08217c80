"""``python -m mtlora <command> [arguments]``: the ``mtlora`` command (:mod:`mtlora.cli`)."""

import sys

from mtlora.cli import main

sys.exit(main())
