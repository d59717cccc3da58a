"""``python -m spa``: the same as the ``spa`` command."""

import sys

from .cli import main

sys.exit(main())
