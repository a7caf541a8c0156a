"""Core: what every layer may use: knobs (conf), problems, correlation ids, metrics, ASGI types, clocks, deadlines."""
