"""Training and evaluation commands: data loading, configs, train_segmentation, train_prognosis, evaluate."""
