"""`python -m warp_phys ...`: the `warp-phys` command line."""

import sys

from warp_phys.cli import main

sys.exit(main())
