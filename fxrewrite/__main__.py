"""``python -m fxrewrite`` runs the same ``main`` as the ``fxrewrite`` console script."""

import sys

from fxrewrite.cli import main

sys.exit(main())
