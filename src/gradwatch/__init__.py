"""gradwatch: see, diagnose and fix vanishing and exploding gradients.

The public surface is deliberately small; everything else is reached by module path
(``gradwatch.keras.GradWatch``, ``gradwatch.sweep``, ``gradwatch.report``). The names load on first
use (PEP 562), so ``import gradwatch.cli`` does not pay seconds of torch and scikit-learn imports
before ``gradwatch --help`` can answer.
"""

import sys
from importlib import import_module
from types import ModuleType

__version__ = "0.1.0"
__all__ = ["Spec", "train", "watch", "diagnose", "doctor", "Store", "__version__"]
# public name -> the module that defines it
_HOME = {"Spec": "spec", "train": "train", "watch": "watch", "diagnose": "diagnose", "doctor": "doctor",
         "Store": "store"}


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'gradwatch' has no attribute {name!r}")
    value = getattr(import_module(f"gradwatch.{_HOME[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


class _Surface(ModuleType):
    """The package, keeping each public name for the function when a same-named folder is imported.

    ``watch``, ``diagnose`` and ``doctor`` are folders; importing one makes the import system set
    ``gradwatch.<name>`` to the folder's module, after which ``gradwatch.diagnose(records)`` would
    call a module. Refusing that one binding leaves the name to ``__getattr__`` (the function);
    ``from gradwatch.diagnose import rules`` still finds the folder in ``sys.modules``.
    """

    def __setattr__(self, name: str, value) -> None:
        if not (name in _HOME and isinstance(value, ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Surface
