"""server layer of postroom."""
