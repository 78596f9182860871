"""The one place the AIGIS version lives."""

__version__ = "0.1.0"
