"""duquant: in progress."""
