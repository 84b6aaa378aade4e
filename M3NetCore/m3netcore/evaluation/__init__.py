"""Evaluation and benchmarks of the models: metrics of a model, cross-validation, the accuracy table, speed.

This room sits above :mod:`m3netcore.train` (it trains through it) and nothing in ``train``
imports from it.
"""
