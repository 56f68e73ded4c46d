"""DKIM signing of outgoing mail."""
