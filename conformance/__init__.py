"""diffkv conformance suite: point it at any DiffKV backend class."""
