"""editbench: a benchmark harness for lifelong knowledge editing of causal LMs."""
__version__ = "0.1.0"
