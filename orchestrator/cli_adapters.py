"""`carpool eval` and `carpool generate`: using finished adapters, many at once."""

from __future__ import annotations
