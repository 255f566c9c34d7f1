"""Job files at the user boundary: YAML read strictly, relative paths resolved, every
problem of every file reported at once (field by field, then the base, the datasets
and `init_from` adapters).

May import: workers.spec, workers.base, workers.data, workers.peft_files
"""
