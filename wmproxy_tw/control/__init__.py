"""control capability."""
