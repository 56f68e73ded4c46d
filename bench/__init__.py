"""Load-testing toolkit: a local rig (DNS, sink MX servers, the engine) and a load generator."""
