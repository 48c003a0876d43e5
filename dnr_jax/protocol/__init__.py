"""The paper's experiment protocol: runs, tables and figures.

``experiment`` (methods x variants x backbones x seeds, each a
``train.train_and_evaluate`` run), ``report`` (the results tables and paired
t-tests) and ``plots`` (learning curves, Figure 5, Figure 3).
"""
