"""pyroflows: normalizing flows written for Pyro.

Layers map base to data (``x = f(z)``, Pyro's convention) and are Pyro
``TransformModule``s; `Flow` turns a stack of them into a distribution.
"""

from . import conditioners, datasets, flows, infer, plot, splines, transformers, transforms
from .distribution import DiagNormal, Flow, FlowDistribution
from .infer import AutoFlow, GuideTraining, train_guide
from .io import ModelFileError, load, save
from .training import FitHistory, fit
from .transforms import *  # noqa: F403 (the layers: listed once, in transforms.__all__)
from .workflow import Diagnosis, diagnose, to_inference_data

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "Flow",
    "FlowDistribution",
    "DiagNormal",
    *transforms.__all__,
    "fit",
    "diagnose",
    "Diagnosis",
    "to_inference_data",
    "AutoFlow",
    "train_guide",
    "GuideTraining",
    "FitHistory",
    "save",
    "load",
    "ModelFileError",
    "conditioners",
    "datasets",
    "infer",
    "plot",
    "flows",
    "splines",
    "transformers",
    "transforms",
]
