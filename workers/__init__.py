"""carpool's data plane: everything that touches tensors, one folder per subsystem.

From the bottom up: `spec` (the job schema), `base` (the frozen base), `variants`
(adapter kinds), `data` (datasets and fused batches), `bank` (routing rows to
adapters), `peft_files` (PEFT's adapter files), `losses`, `distributed`, then
`training` (the engine core) and `after_training` (eval, generation, merging).
Each folder's `__init__` names what it may import; nothing here imports the
control plane or Ray.
"""
