"""optforge: a declarative, make-style build for making trained models small and fast."""

__version__ = "0.1.0"
