"""The outside world: PostgreSQL, Redis, the message bus, feeds, embedded servers."""
