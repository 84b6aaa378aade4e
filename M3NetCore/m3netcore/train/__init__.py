"""Training of the models: settings, data, the trainer, runs (one process or torchrun), figures of a run."""

# What a run or a report says when it cannot draw its PNGs (matplotlib is the [report] extra).
NO_FIGURES = "no PNG figures: they need matplotlib (pip install 'm3net-core[report]')"
