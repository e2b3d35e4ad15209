"""tunnel capability."""
