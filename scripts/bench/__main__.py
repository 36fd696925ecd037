"""`python3 -m bench` from scripts/: the same as `python3 scripts/bench.py`."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
