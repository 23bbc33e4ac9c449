"""`python -m mettle` is the `mettle` command."""

import sys

from mettle.cli import main

sys.exit(main())
