"""tradeplane: a self-hosted trading platform core."""

__version__ = "0.1.0"
