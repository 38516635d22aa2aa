"""``python -m vscale_plugin.apps.compare``: the comparison report, the same as the ``vsp-compare`` command and
``launchers/compare.py``."""

from vscale_plugin.apps.compare.cli import main

if __name__ == "__main__":
    main()
