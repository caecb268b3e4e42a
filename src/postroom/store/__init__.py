"""store layer of postroom."""
