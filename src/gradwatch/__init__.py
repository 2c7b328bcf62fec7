"""gradwatch: see, diagnose and fix vanishing and exploding gradients.

The public surface is deliberately small; everything else is reached by module path
(``gradwatch.keras.GradWatch``, ``gradwatch.sweep``, ``gradwatch.report``). The names load on first
use (PEP 562), so ``import gradwatch.cli`` does not pay seconds of torch and scikit-learn imports
before ``gradwatch --help`` can answer.
"""

from importlib import import_module

__version__ = "0.1.0"
__all__ = ["Spec", "train", "watch", "diagnose", "Store", "__version__"]
# public name -> the module that defines it
_HOME = {"Spec": "spec", "train": "train", "watch": "watch", "diagnose": "diagnose", "Store": "store"}


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'gradwatch' has no attribute {name!r}")
    value = getattr(import_module(f"gradwatch.{_HOME[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
