"""Workflows built on the adapters: export of the selected configuration, final training."""
