"""policy layer of postroom."""
