"""Training, cross-validation, evaluation and benchmarks of the models."""

# What a run or a report says when it cannot draw its PNGs (matplotlib is the [report] extra).
NO_FIGURES = "no PNG figures: they need matplotlib (pip install 'm3net-core[report]')"
