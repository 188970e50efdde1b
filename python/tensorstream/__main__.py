"""``python -m tensorstream``: the command line (see tensorstream.cli)."""

import sys

from .cli import main

sys.exit(main())
