"""`python -m daemon` is `selectd`."""

import sys

from .cli import main

sys.exit(main())
