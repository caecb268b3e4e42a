"""The server's defences on the open Internet: shared limits, DNS lists, client checks."""
