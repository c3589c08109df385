"""DomainBed's names: datasets, their environments, and the order algorithms are listed in.

These are plain data (no torch), so the reporting code can label tables without loading any
dataset. The lists follow DomainBed (facebookresearch/DomainBed, MIT): ``datasets.DATASETS``,
each dataset class's ``ENVIRONMENTS`` and ``algorithms.ALGORITHMS``.
"""

from __future__ import annotations

#: Environment names of each DomainBed dataset, in DomainBed's order (the index is ``env{i}``).
DATASET_ENVIRONMENTS: dict[str, list[str]] = {
    "Debug28": ["0", "1", "2"],
    "Debug224": ["0", "1", "2"],
    "ColoredMNIST": ["+90%", "+80%", "-90%"],
    "RotatedMNIST": ["0", "15", "30", "45", "60", "75"],
    "VLCS": ["C", "L", "S", "V"],
    "PACS": ["A", "C", "P", "S"],
    "OfficeHome": ["A", "C", "P", "R"],
    "TerraIncognita": ["L100", "L38", "L43", "L46"],
    "DomainNet": ["clip", "info", "paint", "quick", "real", "sketch"],
    "SVIRO": ["aclass", "escape", "hilux", "i3", "lexus", "tesla", "tiguan", "tucson", "x5", "zoe"],
    "WILDSCamelyon": ["hospital_0", "hospital_1", "hospital_2", "hospital_3", "hospital_4"],
    "WILDSFMoW": ["region_0", "region_1", "region_2", "region_3", "region_4", "region_5"],
}

#: Dataset order of DomainBed's tables.
DATASETS: list[str] = list(DATASET_ENVIRONMENTS)

#: Algorithm order of DomainBed's tables (algorithms not listed come after, as first seen).
ALGORITHMS: list[str] = [
    "ERM", "Fish", "IRM", "GroupDRO", "Mixup", "MLDG", "CORAL", "MMD", "DANN", "CDANN", "MTL",
    "SagNet", "ARM", "VREx", "RSC", "SD", "ANDMask", "SANDMask", "IGA", "SelfReg", "Fishr",
    "TRM", "IB_ERM", "IB_IRM", "CAD", "CondCAD", "Transfer", "CausIRL_CORAL", "CausIRL_MMD",
    "EQRM",
]


def environment_names(dataset: str, n_envs: int | None = None) -> list[str]:
    """Names of ``dataset``'s environments; ``["env0", "env1", ...]`` for an unknown dataset.

    ``n_envs`` is needed only for datasets DomainBed does not know (read it from the records).
    """
    if dataset in DATASET_ENVIRONMENTS:
        return list(DATASET_ENVIRONMENTS[dataset])
    if n_envs is None:
        raise ValueError(
            f"dataset {dataset!r} is not one of DomainBed's {DATASETS}; pass n_envs (the number "
            "of env{i}_out_acc keys in its records) to name its environments env0, env1, ..."
        )
    return [f"env{i}" for i in range(n_envs)]


def ordered(names: list[str], canonical: list[str]) -> list[str]:
    """``names`` (unique) in ``canonical`` order first, then the others in their given order."""
    unique = list(dict.fromkeys(names))
    return [n for n in canonical if n in unique] + [n for n in unique if n not in canonical]
