"""forward capability."""
