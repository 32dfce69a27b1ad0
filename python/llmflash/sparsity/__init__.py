"""What decides which FFN neurons a token wants: the sources behind one interface (source.py), the
rules that need no calibration (rules.py) and the early guesses (guesses.py)."""

from .guesses import NextLayerGuess, SameLayerGuess
from .rules import AllNeurons, Oracle
from .source import WantedSource, make_source

__all__ = ["AllNeurons", "NextLayerGuess", "Oracle", "SameLayerGuess", "WantedSource", "make_source"]
