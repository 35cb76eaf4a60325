"""Policy plugins."""
