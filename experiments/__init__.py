"""Scripts that reproduce benchmarks and figures; never imported by the packages."""
