"""The durable mail queue: queue files on disk, the scheduler and its rules, bounces (DSNs)."""
