"""DomainBed's algorithms by name: ``get_algorithm_class("Fishr")``.

Every algorithm has DomainBed's interface (``update(minibatches) -> dict``, ``predict(x)``,
built from ``(input_shape, num_classes, num_domains, hparams)``) and DomainBed's update rule;
its hyperparameters (defaults and random-search ranges) are in :mod:`.hparams`. One module per
family, each with the equations in its docstring:

- :mod:`fishr_lite.domainbed.erm`: ``ERM`` (the base class of all others);
- :mod:`fishr_lite.domainbed.invariance`: ``IRM``, ``VREx``, ``Fishr``
  (:class:`~fishr_lite.domainbed.invariance.FishrAlgorithm`), ``IGA``;
- :mod:`fishr_lite.domainbed.alignment`: ``CORAL``, ``MMD``;
- :mod:`fishr_lite.domainbed.robust`: ``GroupDRO``, ``Mixup``, ``Fish``;
- :mod:`fishr_lite.domainbed.masks`: ``ANDMask``, ``SANDMask``.

Penalties that :mod:`fishr_lite.objectives` defines (IRM, V-REx, Fishr, IGA, CORAL) are used
from there, not written again.
"""

from __future__ import annotations

from .alignment import CORAL, MMD
from .erm import ERM, Minibatches
from .invariance import IGA, IRM, FishrAlgorithm, VREx
from .masks import ANDMask, SANDMask
from .robust import Fish, GroupDRO, Mixup

__all__ = ["ALGORITHM_CLASSES", "get_algorithm_class", "Minibatches", "ERM", "IRM", "VREx",
           "FishrAlgorithm", "IGA", "CORAL", "MMD", "GroupDRO", "Mixup", "Fish", "ANDMask",
           "SANDMask"]

#: DomainBed's name of each algorithm, in DomainBed's order (``algorithms.ALGORITHMS``).
ALGORITHM_CLASSES: dict[str, type[ERM]] = {
    "ERM": ERM, "Fish": Fish, "IRM": IRM, "GroupDRO": GroupDRO, "Mixup": Mixup, "CORAL": CORAL,
    "MMD": MMD, "VREx": VREx, "ANDMask": ANDMask, "SANDMask": SANDMask, "IGA": IGA,
    "Fishr": FishrAlgorithm,
}


def get_algorithm_class(name: str) -> type[ERM]:
    """The class of DomainBed's algorithm ``name``; a ``ValueError`` lists the known names."""
    if name not in ALGORITHM_CLASSES:
        raise ValueError(f"unknown algorithm {name!r}; use one of {list(ALGORITHM_CLASSES)}.")
    return ALGORITHM_CLASSES[name]
