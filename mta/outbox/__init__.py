"""The event outbox: every event a sink wants, kept in the spool's LMDB until each sink
([[webhooks]], [[amqp]]) has taken it, at least once, in order.

    sink.py      what a sink is (EventSink, SinkFailed)
    store.py     the outbox in LMDB: append, cursors, prune, dead letters, replay
    wiring.py    how events enter it, in the transaction of their change; start_outbox
    dispatch.py  worker 0 hands the events to the sinks: batches, retries, dead letters
    sinks.py     the configured sinks; webhook.py / signing.py: the HTTP sink; amqp.py
    status.py    what operators see: `mta webhook`, the admin API, the dashboard, /metrics
"""
