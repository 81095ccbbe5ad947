"""The page store: Redis (single node or Cluster-ready key layout) and an embedded default."""
