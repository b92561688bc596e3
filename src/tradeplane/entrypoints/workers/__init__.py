"""Long-running platform processes other than the API: engine shards (and later market data, risk monitor)."""
