"""quarot: in progress."""
