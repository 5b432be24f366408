"""The training code: models and their budget, the loss, batches, logits, precision, checkpoints and
the distillation loop. Nothing here imports Ray: the same loop runs in a Ray trial, a test or a notebook."""
