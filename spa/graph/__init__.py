"""Analysis stage: per-op axis rules, the dependency of channel atoms, and the groups."""
