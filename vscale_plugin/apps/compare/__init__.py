"""Baseline vs V-scale from MLflow runs, behind ``launchers/compare.py``.

- ``runs``: the MLflow side - reaching the store, selecting and reading training runs, logging the comparison run
- ``report``: report.md and its table
- ``figures``: the paper's figures, one function each
- ``cli``: the command (flags, the order of the steps above, one-line errors)
"""
