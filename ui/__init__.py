"""The Gradio front end (``app``), its HTTP client of the serving API (``client``), its settings (``config``)
and `medhash ui` / `medhash demo`. Imports nothing of the other medhash packages: it speaks HTTP only."""
