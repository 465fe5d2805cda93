"""Speed benchmarks, run through `medhash bench`."""
