"""The oracle (pruned == masked original) and its tolerance; MACs, params and latency."""
