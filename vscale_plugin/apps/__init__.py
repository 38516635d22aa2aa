"""The applications built on the library: post-hoc analysis, the baseline vs V-scale comparison, the paired study.

Each sits behind a thin script in launchers/. They share vscale_plugin.launch with the trainer but not its internals
(study reads only the presets of train/recipe.py), and nothing in the library imports them.
"""
