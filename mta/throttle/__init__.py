"""Traffic shaping and adaptive throttling per destination and provider."""
