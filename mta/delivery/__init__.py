"""Outbound delivery: MX resolution, pooled SMTP connections, outcomes."""
