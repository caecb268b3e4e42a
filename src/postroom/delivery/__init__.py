"""Couriers for queued mail: local (into Maildirs) and remote (SMTP to the next hop)."""
