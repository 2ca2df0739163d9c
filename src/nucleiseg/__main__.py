"""`python -m nucleiseg ...` runs the `nucleiseg` command."""

import sys

from .cli import main

sys.exit(main())
