"""The report stage: `results.json`, `report.md`, `plots/` and the final wandb run, from the
run's files alone."""
