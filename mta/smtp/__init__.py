"""SMTP intake: the listener upstream apps submit to."""
