"""Measuring and logging: router-gradient fidelity, default-vector quality and oracles, training
metrics and GPU telemetry. Nothing here runs in the layer's forward."""
