"""Core: configs and their registry, errors, recipes and artifacts."""
