"""The adapter bank beside the base: forward hooks that route each job's rows through
its own adapter, per segment in a loop or for all segments at once (grouped math),
with per-row dropout masks that never depend on a row's neighbours.

May import: workers.spec, workers.base, workers.variants, workers.data
"""
