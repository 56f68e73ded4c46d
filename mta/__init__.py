"""A high-throughput mail transfer agent and delivery engine."""

__version__ = "0.1.0"
