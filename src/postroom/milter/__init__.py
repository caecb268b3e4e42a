"""Milters: the asyncio shell around the milter client core, and how the SMTP server uses it."""
