"""medhash core, free of any serving, training or UI framework: configuration (``config``), the method
registry (``registry``), datasets (``data``), pretrained backbones (``backbones``), the feature cache
(``features``), augmentation (``augment``), the hashing methods (``methods``), codes (``codes``), the
Milvus index (``index``), evaluation (``evaluation``), run directories (``run_dir``) and the CLI core (``cli``).
It imports none of the other medhash packages."""
