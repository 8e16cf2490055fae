"""Scale benchmark: synthetic families up to 100,000 tensors and full-size models on meta.

``python -m benchmarks.scale``; see :mod:`benchmarks.scale.run` and ``benchmarks/README.md``.
"""
