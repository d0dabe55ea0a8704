"""The serving runtime: the request loop and controller, and the Ray actor around them."""
