"""Measuring trained models: the benchmark, latency, the memory a trial holds, scores and the
error analysis. No Ray here: the runtime runs these where the trials run."""
