"""The job schema: `JobSpec` and its parts, each field declared once with its checks,
and PEFT's per-module rank and alpha patterns (`lora_patterns`).

May import: nothing else of carpool
"""
