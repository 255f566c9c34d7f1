"""PEFT's files: reading adapter directories (LoRA, DoRA, VeRA, AdaLoRA), checking them
against a base, writing a job's adapter as PEFT saves one, and loading finished
adapters of any kind back into weights.

May import: workers.spec, workers.base, workers.variants
"""
