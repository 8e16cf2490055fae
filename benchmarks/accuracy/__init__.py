"""Accuracy of weight_mapper on real architecture pairs with proved ground truth.

Run ``python -m benchmarks.accuracy`` from the repository root; see benchmarks/README.md.
"""
