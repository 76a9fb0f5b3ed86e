"""reclaimd HTTP API: REST and Prometheus metrics over the fleet state."""
