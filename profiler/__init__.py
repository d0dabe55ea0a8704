"""Measurement: data sets, throughput and latency of generation, router statistics."""
