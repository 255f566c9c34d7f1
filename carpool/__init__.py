"""carpool: train many LoRA fine-tuning jobs at once on one frozen base model.

The repository's `orchestrator/` (control plane) and `workers/` (data plane)
install as `carpool.orchestrator` and `carpool.workers`: `carpool` is the only
name a user's environment gains.
"""
