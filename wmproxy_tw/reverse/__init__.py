"""reverse capability."""
