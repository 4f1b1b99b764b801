"""The QMP monitor: jsonstream (input framing), session (one client:
negotiation, dispatch, replies, events), server (UNIX sockets), executor
(the CommandExecutor interface the daemon implements for them)."""
