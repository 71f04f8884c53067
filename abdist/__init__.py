"""abdist: train classifiers on imbalanced data with a learned loss (AutoBalance, SelMix, FORML)."""

__version__ = "0.1.0"
