"""awq: in progress."""
