"""Who may send what to whom: recipients and relaying, sender checks, AUTH throttling."""
