"""Data and batching: datasets and their tokenization (cached; preference records as
pairs of rows), which rows belong to which job (`segment`), fused micro-batches padded
or packed (a pair's rows always together), and attention kept within each packed row.

May import: workers.spec
"""
