"""Editors, one module per method, each registered by name (see editbench.registry)."""
