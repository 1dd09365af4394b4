"""Built-in scoring passes (importable as ``graphprune.passes``); each registers itself by name."""
from .bernoulli import Bernoulli
from .hywia import HyWIA
from .loraprune import LoRAPrune
from .magnitude import Magnitude
from .pat import PAT
from .taylor import Taylor

__all__ = ["Bernoulli", "HyWIA", "LoRAPrune", "Taylor", "Magnitude", "PAT"]
