"""The pieces of a local test rig: DNS on loopback, sink MX servers, throttling receivers."""
