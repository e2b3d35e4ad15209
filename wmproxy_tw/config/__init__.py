"""config capability."""
