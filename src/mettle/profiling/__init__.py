"""Lightweight profiling utilities for the training loop."""

from mettle.profiling.stopwatch import Stopwatch

__all__ = ["Stopwatch"]
