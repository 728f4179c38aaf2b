"""`python -m ddpm.cli`: the same command as `python -m ddpm`."""

import sys

from . import main

sys.exit(main())
