"""`python -m ddpm` (and `torchrun -m ddpm`): the command line."""

import sys

from .cli import main

sys.exit(main())
