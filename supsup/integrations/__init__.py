"""Integrations with other continual-learning frameworks.

* :mod:`supsup.integrations.avalanche`: SupSup as an Avalanche strategy, a cached data path,
  models sized from any Avalanche stream, Avalanche's classic MNIST benchmarks;
* :mod:`supsup.integrations.baselines`: Avalanche's baselines (naive, EWC, SI, LwF, replay,
  GEM, PackNet) on the same streams, backbones and step budgets.

Both need ``avalanche-lib`` (the ``avalanche`` extra); nothing is imported here, so
``import supsup`` never pulls Avalanche in. The ``backend: avalanche`` runners are in the
experiment layer (:mod:`supsup.experiment`).
"""
