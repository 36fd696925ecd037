#!/usr/bin/env python3
"""Run selectd's benchmark: `python3 scripts/bench.py [--quick] [--only NAME,...] [--results DIR]`.

See scripts/bench/cli.py for every option. This file only makes the bench package importable:
run as a script, its directory (scripts/) is sys.path[0], and there the package scripts/bench/
is found before this module of the same name.
"""

from __future__ import annotations

import sys

from bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
