"""``python -m trio_hibernate serve MODULE:APP`` (or ``--version``): see
``trio_hibernate._cli``."""

from __future__ import annotations

import sys

from ._cli import main

if __name__ == "__main__":
    sys.exit(main())
