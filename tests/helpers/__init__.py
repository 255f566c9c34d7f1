"""Builders shared by several test files: job configs, clusters, references, measures."""
