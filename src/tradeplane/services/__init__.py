"""Use cases. Each takes an open connection (or the Database) and never commits on its own: the caller's
scope (an HTTP request, a message batch, a CLI command) owns the transaction."""
