"""`python -m carpool ...` runs the `carpool` command."""

import sys

from carpool.orchestrator.cli.main import main

sys.exit(main())
