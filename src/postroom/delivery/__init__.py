"""The couriers: one delivery attempt each, into local Maildirs or over SMTP to the next hop."""
