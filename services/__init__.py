"""medhash core: datasets, encoders, hashing, index and metrics, free of any serving or UI framework."""
