"""Model cards for distilled RetNet students, generated from a run's metadata (see card.py)."""

from .card import build_card, find_placeholders, write_card

__all__ = ["build_card", "find_placeholders", "write_card"]
