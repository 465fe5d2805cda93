"""Training on Ray Train: the worker loop every method shares (``loop``), the trainer that writes a run
directory (``trainer``), loss plots and `medhash train`. Imports only ``medhash.services``."""
