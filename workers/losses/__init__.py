"""Losses: per-token log-probabilities and each job's loss over its own rows, computed
in chunks so no full-vocabulary logits tensor is kept.

May import: workers.spec, workers.data
"""
