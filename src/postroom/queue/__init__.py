"""The durable mail queue: envelopes and messages on disk, the scheduler, bounces."""
