"""``python -m defectscope.cli ARGS`` runs the command line."""

import sys

from .commands import main

sys.exit(main())
