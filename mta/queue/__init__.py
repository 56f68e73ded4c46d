"""The durable spool (LMDB) and the delivery scheduler."""
