"""The trick protocol: what a trick sees of a batch and a step, and the module that runs tricks."""

from lit_tricks.core.batch import StepOutput, TrickBatch
from lit_tricks.core.module import TrickModule
from lit_tricks.core.trick import Trick

__all__ = ["StepOutput", "Trick", "TrickBatch", "TrickModule"]
