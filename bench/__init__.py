"""Performance benchmarks of midpo against a stock baseline run in the same process (docs/benchmarks.md).

Shipped as the package ``midpo_bench``: ``midpo bench experts`` runs :mod:`midpo_bench.experts`, ``midpo bench moe``
:mod:`midpo_bench.moe`.
"""
