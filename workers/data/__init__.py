"""Data and batching: datasets and their tokenization (cached), which rows belong to
which job (`segment`), fused micro-batches padded or packed, and attention kept within
each packed row.

May import: workers.spec
"""
