"""`python -m clm_runner` (also what torchrun and `accelerate launch -m` start)."""

import sys

from clm_runner.cli import main

sys.exit(main())
