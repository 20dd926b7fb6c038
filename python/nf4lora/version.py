"""The package version (one definition; pyproject.toml carries the same for packaging)."""
__version__ = "0.1.0"
