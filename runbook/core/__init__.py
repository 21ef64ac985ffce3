"""The engine's layer: steps, the engine, the ledger, transports, the run context. Knows nothing of etcd or
Patroni; sections, procedures and tasks build on it, never the other way round."""
