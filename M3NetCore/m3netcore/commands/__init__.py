"""The ``m3net`` subcommands, one module per command group; :mod:`m3netcore.cli` assembles them.

predict (predict, demo, model-info, predict-many), model_files (bundle, export), lidc,
training (train, cv, evaluate), benchmark (throughput, accuracy); out_paths holds the output
checks they share. Heavy modules are imported inside the commands so ``m3net --help`` answers at once.
"""
