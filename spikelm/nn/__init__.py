"""The spiking building blocks: the neurons (:mod:`spikelm.nn.neurons`: SpikeLM's elastic bi-spiking neuron and
its kernels, SpikeLLM's GIF neuron, each a plug-in of one interface), spiking layers, firing-rate statistics.

``spikelm.nn.neuron`` and ``spikelm.nn.gif``, where the two neurons lived before they became plug-ins, are aliases
of :mod:`spikelm.nn.neurons.elastic` and :mod:`spikelm.nn.neurons.gif`: importing an old path gives the same module
object (so code, monkeypatches and pickles that name it keep working), loaded on first use as before. New code
imports from :mod:`spikelm.nn.neurons`.
"""

import importlib
import importlib.abc
import importlib.util
import sys

_OLD_PATHS = {f"{__name__}.neuron": f"{__name__}.neurons.elastic", f"{__name__}.gif": f"{__name__}.neurons.gif"}


class _OldPathAlias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ``spikelm.nn.neuron`` / ``spikelm.nn.gif`` as the modules they moved to."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _OLD_PATHS:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return importlib.import_module(_OLD_PATHS[spec.name])  # the module itself: its own name and spec stay

    def exec_module(self, module) -> None:
        pass  # already executed under its new name


if not any(type(finder).__name__ == "_OldPathAlias" for finder in sys.meta_path):
    sys.meta_path.append(_OldPathAlias())
