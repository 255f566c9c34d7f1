"""`python -m carpool.orchestrator.demo`: the demo `make demo` runs."""

import sys

from carpool.orchestrator.demo.run import main

sys.exit(main())
