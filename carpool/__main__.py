"""`python -m carpool ...` runs the `carpool` command."""

import sys

from carpool.orchestrator.cli import main

sys.exit(main())
