"""Where users and mail live: the user directory, the mailboxes, and the one durable write."""
