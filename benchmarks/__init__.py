"""Speed benchmarks, the quality comparison and the ablation, run through `medhash bench`."""
