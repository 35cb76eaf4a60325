"""Provider plugins."""
