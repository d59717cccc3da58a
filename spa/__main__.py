"""``python -m spa``: the same as the ``spa`` command."""

import sys

from .cli.main import main

sys.exit(main())
