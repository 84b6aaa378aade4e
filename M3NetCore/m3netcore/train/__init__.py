"""Training: a first, plain loop (the training issue grows it into train/cv/evaluate)."""
