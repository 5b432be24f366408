"""The data stage: sources read, labels mapped, splits carved and sealed, texts tokenized."""
