"""The rules of the FA family: how each method forms B (:mod:`.methods`), brsf's random draws
(:mod:`.philox`) and the activation functions with their derivatives (:mod:`.activations`)."""

from .activations import ACTIVATIONS
from .methods import FEEDBACK_METHODS, INITS, METHODS, FeedbackRule

__all__ = ["ACTIVATIONS", "FEEDBACK_METHODS", "INITS", "METHODS", "FeedbackRule"]
