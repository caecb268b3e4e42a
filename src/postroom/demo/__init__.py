"""`postroom demo`: the seed's story (DESIGN.md) on loopback, every step a real exchange."""
