"""The fleet: a model registry (MLflow), a transport (NATS JetStream), device clients beside the sidecar,
staged canary rollouts run by a controller, and a simulator. The wire contract is fleet.protocol."""
