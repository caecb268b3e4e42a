"""postroom: a complete e-mail system in Python (SMTP, Maildir, POP3)."""

__version__ = "0.1.0"
