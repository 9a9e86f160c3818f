"""``python -m flatness``: see :mod:`flatness._cli`."""

from __future__ import annotations

import sys

from flatness._cli import main

if __name__ == "__main__":
    sys.exit(main())
