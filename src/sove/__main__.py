"""``python -m sove``: same as the ``sove`` console script."""

import sys

from sove.cli import main

sys.exit(main())
