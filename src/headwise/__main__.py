"""``python -m headwise``: the same program as the ``headwise`` command."""

import sys

from headwise.cli import main

sys.exit(main())
