"""kdray: find the best distilled, LoRA-adapted student that fits a trainable-parameter budget."""

__version__ = "0.1.0"
