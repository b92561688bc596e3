"""How the platform is driven: the HTTP API, the CLI and the background workers."""
