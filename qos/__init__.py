"""moe-qos: serve Mixture-of-Experts models under quality-of-service goals."""

__version__ = "0.1.0"
