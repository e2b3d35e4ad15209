"""balance capability."""
