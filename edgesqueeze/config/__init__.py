"""Each stage's frozen Config, and nothing else: what a recipe section validates into.

``compress`` (prune, cluster, ptq, retraining, the ``compress`` section), ``export`` (the
``export`` section) and ``budget`` (the ``budget`` section, the CI gate's spec). The recipe
(:mod:`edgesqueeze.recipe`) assembles them without importing any stage's code; the stages
import them from here. Field rules (types, choices, ranges) use :mod:`edgesqueeze._config`.
"""
