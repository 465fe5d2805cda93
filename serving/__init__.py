"""The Ray Serve application (``app``), its settings (``config``), the in-process query path (``pipeline``),
ingestion (``ingest``), Prometheus metrics (``prometheus``) and `medhash serve` / `medhash index`.
Imports only ``medhash.services``."""
