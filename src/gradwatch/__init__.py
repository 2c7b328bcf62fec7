"""gradwatch: see, diagnose and fix vanishing and exploding gradients.

The public surface is deliberately small; everything else is reached by module path
(``gradwatch.keras.GradWatch``, ``gradwatch.sweep``, ``gradwatch.report``).
"""

from gradwatch.diagnose import diagnose
from gradwatch.spec import Spec
from gradwatch.store import Store
from gradwatch.train import train
from gradwatch.watch import watch

__version__ = "0.1.0"
__all__ = ["Spec", "train", "watch", "diagnose", "Store", "__version__"]
