"""``python -m mcore ...`` runs the same CLI as the ``mcore`` console script."""

import sys

from mcore.cli import main

sys.exit(main())
