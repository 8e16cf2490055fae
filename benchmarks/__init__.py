"""Benchmarks of weight_mapper; not part of the installed package (see benchmarks/README.md)."""
