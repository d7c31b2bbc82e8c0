"""NeuraOS host controller."""

__version__ = "0.1.0"
