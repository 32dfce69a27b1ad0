"""What decides which FFN neurons a token wants.

- source.py: the WantedSource interface, and make_source (a sparsity spec -> a source);
- rules.py: sources that need no calibration (AllNeurons, Oracle);
- guesses.py: early guesses of any source's set (NextLayerGuess, SameLayerGuess);
- labels.py, neurons.py: what "active" means, and store positions vs original neuron ids;
- lowrank.py, shadow.py: the two predictor kinds; quantiles.py: their thresholds;
- predictors.py: the calibrated predictors as a source; predictors_file.py: their file;
- calibration.py: recording a store's activations and training its predictors.

Below the strategies: it imports the store, the models and base utilities only.
"""

from .guesses import NextLayerGuess, SameLayerGuess
from .predictors import Predictors
from .predictors_file import load_predictors
from .rules import AllNeurons, Oracle
from .source import WantedSource, make_source

__all__ = [
    "AllNeurons",
    "NextLayerGuess",
    "Oracle",
    "Predictors",
    "SameLayerGuess",
    "WantedSource",
    "load_predictors",
    "make_source",
]
