"""DomainBed at CPU scale: records, model selection and reports; datasets, networks,
algorithms, a runner and sweeps that write DomainBed's ``results.jsonl``.

One idea per module: ``records`` (read a sweep), ``selection`` (DomainBed's three model
selection methods), ``reporting`` / ``report`` (tables and their command line), ``names``
(DomainBed's dataset, environment and algorithm names), ``splits`` (seeds, in/out splits),
``datasets``, ``networks``, ``algorithms`` (the registry of DomainBed's names; ERM in ``erm``,
IRM / VREx / Fishr / IGA in ``invariance``, CORAL / MMD in ``alignment``, GroupDRO / Mixup /
Fish in ``robust``, ANDMask / SANDMask in ``masks``), ``hparams`` (the registry), ``train``
(one run), ``sweep`` (many runs, resumable, sequential or through submitit).
Submodules are imported on demand, so reading records needs neither torch nor pandas.
"""
