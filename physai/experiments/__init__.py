"""Experiments built on the public API, each shaped by the protocol of ``physai.experiments._base`` (a config
dataclass, ``run``, a result with ``summary``/``trajectories``/``save``/``load``/``plot``, a ``physai <name>``
subcommand), so that ``physai.sweep`` runs any of them:

- ``eos``: edge of stability (Cohen et al. 2021);
- ``threshold``: threshold neurons on sparse coding (Ahn et al. 2022);
- ``catapult``: the catapult phase of large learning rates (Lewkowycz et al. 2020);
- ``width_transfer``: learning-rate transfer across widths under muP / mean-field (Yang & Hu 2021);
- ``criticality``: kernel recursions and finite-width corrections against Monte Carlo (Roberts, Yaida, Hanin);
- ``lego_transformer``: train on short LEGO chains, test on long ones (Zhang et al. 2022).
"""
