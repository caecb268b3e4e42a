"""client layer of postroom."""
