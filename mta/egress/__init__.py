"""Sending identities: source addresses (each with its EHLO name), pools of them, and
the choice of a source for each message (issue 16).

- `pools`: pure choice logic: smooth weighted round robin within a pool, and which pool
  a message uses (account, campaign header, trial accounts);
- `chooser`: the source of each message at dispatch (`Egress`): weights, sources down
  at run time, operators' suspensions, the gate; or why the message waits;
- `gate`: the interface through which warm-up (`warmup_gate`) admits a source for a provider;
- `counters`: per source and provider outcome counts and the sources' state (LMDB);
- `status`: the report `mta egress status`, /api/v1/egress and the dashboard show;
- `service`: the startup check (every address bindable) and a worker's assembly.

Throttle state is kept per source and destination (`Destination.from_source`,
mta.throttle.throttle), so the adaptive limits and the cluster's budgets are per source.
"""
