"""``python -m bench``: see :func:`bench.main`."""

import sys

from . import main

raise SystemExit(main(sys.argv[1:]))
