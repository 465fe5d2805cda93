"""Backbone features: the on-disk cache (``cache``), a dataset's feature matrices (``featureset``), `medhash features`."""
