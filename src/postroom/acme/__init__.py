"""Certificates from an ACME CA (RFC 8555): when one is due, and obtaining it (blocking)."""
