"""The tamper-evident audit log of every read of patient data."""
