"""The job schema: `JobSpec` and its parts (its `objective` in `objective`), each field
declared once with its checks, and PEFT's per-module rank and alpha patterns.

May import: nothing else of carpool
"""
