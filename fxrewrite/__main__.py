"""``python -m fxrewrite`` runs the same ``main`` as the ``fxrewrite`` console script."""

import sys

from fxrewrite.frontends.cli import main

sys.exit(main())
