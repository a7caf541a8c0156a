"""State: the shared store (Redis over a pipelined RESP connection, or process memory) that policies keep their counters in."""
