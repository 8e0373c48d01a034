"""WISP shared code: configuration, models, protocol types and verification math."""

__version__ = "0.1.0"
