"""``maestro server``: the HTTP API (run history, live events, actions) and the web UI."""
