"""``python -m natgrad``: the ``natgrad`` command (what ``torchrun ... -m natgrad`` runs)."""

import sys

from natgrad.cli import main

if __name__ == "__main__":
    sys.exit(main())
