"""The QMP monitor: jsonstream (input framing), session (one client:
negotiation, dispatch, replies, events), server (UNIX sockets),
introspect (query-qmp-schema)."""
