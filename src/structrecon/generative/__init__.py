"""Generative models in fingerprint space (Fung 2022, sec. 2.3): cVAE and surrogate."""

from .data import load_training_data
from .models import CVAE, CVAESpec, Normaliser, Surrogate, SurrogateSpec
from .training import TrainedModel, TrainingData, load_model, plot_losses, split_indices, train

__all__ = [
    "CVAE",
    "CVAESpec",
    "Normaliser",
    "Surrogate",
    "SurrogateSpec",
    "TrainedModel",
    "TrainingData",
    "load_model",
    "load_training_data",
    "plot_losses",
    "split_indices",
    "train",
]
