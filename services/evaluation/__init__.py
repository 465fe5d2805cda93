"""Retrieval evaluation in one place: metrics (``metrics``), the three protocols (``protocols``), a run's evaluation (``run``)."""
