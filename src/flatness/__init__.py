"""flatness: measure and optimize the flatness of neural-network minima."""

from __future__ import annotations

__version__ = "0.1.0"
