"""Client connections: the byte channel (`net.channel`), SMTP session set-up (`net.smtp`).

A package of its own because two layers open client connections: the relay
(`delivery/`) and the user's tools (`client/`), which may not import each
other, nor `server/`. It sits above the sans-IO cores (`protocol/`), whose
bytes it moves, and imports nothing else of postroom.
"""
