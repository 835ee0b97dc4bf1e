"""Per-object durable storage and alarms."""
