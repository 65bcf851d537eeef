"""jaxnets."""
