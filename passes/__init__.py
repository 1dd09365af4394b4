"""Built-in scoring passes (importable as ``graphprune.passes``); each registers itself by name."""
from .magnitude import Magnitude

__all__ = ["Magnitude"]
