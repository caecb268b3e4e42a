"""delivery layer of postroom."""
