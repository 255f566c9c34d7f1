"""carpool's control plane, one folder per subsystem.

`spec_check` (job files at the boundary), `store` (the queue and state), `sweeps`,
`control` (controller, scheduler, admission; no Ray), `runtime` (the edge to Ray and
the Python `Client`), `cli`, `after_training` (eval, generate, merge in the CLI's
process) and `demo`. Each folder's `__init__` names what it may import.
"""

import os

# carpool talks to Ray with token authentication on. A client connecting to a
# running cluster presents the token (~/.ray/auth_token) only in token mode, and
# Ray reads the mode once, when it is first imported: so set it here, before
# any module of this package imports ray. An operator's explicit setting wins.
os.environ.setdefault("RAY_AUTH_MODE", "token")
