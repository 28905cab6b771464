"""``python -m load.bench``: see the package docstring (load/bench/__init__.py)."""

import sys

from .cli import main

sys.exit(main())
