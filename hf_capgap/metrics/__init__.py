"""`evaluate` metric modules shipped with hf_capgap, loaded by path (no Hub access needed)."""
