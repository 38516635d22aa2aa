"""Baseline vs V-scale with the same seed, data and recipe, then the comparison report (issue 5).

    python launchers/study.py --preset smoke --steps 150
    python launchers/study.py --preset 0.1B --dataset c4 --num_gpus 8 -- --tokenizer gpt2

The work lives in vscale_plugin.apps.study.
"""

from vscale_plugin.apps.study import main

if __name__ == "__main__":
    main()
