"""observe capability."""
