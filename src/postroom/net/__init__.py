"""Client connections, below both the relay (delivery/) and the user's tools (client/)."""
