"""Losses: per-token cross-entropy and each job's loss over its own rows (in chunks, so no
full-vocabulary logits tensor is kept), and the objectives on top of it: a preference
pair's sequence log-probs, its DPO loss against the shared reference, TRL's metrics.

May import: workers.spec, workers.data
"""
