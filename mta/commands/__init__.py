"""Subcommands of the `mta` command line."""
