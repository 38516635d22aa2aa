"""Baseline vs V-scale side by side, from MLflow runs of launchers/pretrain.py (issue 5).

    python launchers/compare.py --experiment vscale-plugin --out compare/
    python launchers/compare.py --experiment vscale-plugin --filter "tags.preset = '0.1B'" --out compare-0.1B/
    python launchers/compare.py --experiment vscale-plugin --runs RUN_ID RUN_ID --out compare/

Writes report.md and figures/*.png to --out and logs them as a new MLflow run tagged `comparison`.
The work lives in vscale_plugin.apps.compare; the command is its cli module.
"""

from vscale_plugin.apps.compare.cli import main

if __name__ == "__main__":
    main()
