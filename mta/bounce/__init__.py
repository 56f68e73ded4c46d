"""Bounce, feedback-loop and auto-reply classification."""
