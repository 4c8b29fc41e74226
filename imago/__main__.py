"""`python -m imago`: the `imago` command."""

import sys

from imago.cli import main

sys.exit(main())
