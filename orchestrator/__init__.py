"""carpool's control plane: job specs, the queue, the scheduler, the controller, the CLI."""

import os

# carpool talks to Ray with token authentication on. A client connecting to a
# running cluster presents the token (~/.ray/auth_token) only in token mode, and
# Ray reads the mode once, when it is first imported: so set it here, before
# any module of this package imports ray. An operator's explicit setting wins.
os.environ.setdefault("RAY_AUTH_MODE", "token")
