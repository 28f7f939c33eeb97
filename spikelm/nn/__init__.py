"""The spiking building blocks: the neurons (:mod:`spikelm.nn.neurons`: SpikeLM's elastic bi-spiking neuron and
its kernels, SpikeLLM's GIF neuron, each a plug-in of one interface), spiking layers, firing-rate statistics.

``spikelm.nn.neuron`` and ``spikelm.nn.gif``, where the two neurons lived before they became plug-ins, are aliases
of :mod:`spikelm.nn.neurons.elastic` and :mod:`spikelm.nn.neurons.gif` (the same module objects, so code and
pickles that name the old paths keep working); new code imports from :mod:`spikelm.nn.neurons`.
"""

import sys as _sys

from .neurons import elastic as neuron
from .neurons import gif

_sys.modules[f"{__name__}.neuron"] = neuron
_sys.modules[f"{__name__}.gif"] = gif
