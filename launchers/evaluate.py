"""Downstream evaluation of trained models, side by side (issue 13; SPEC section 7).

    python launchers/evaluate.py --model checkpoints/off --model checkpoints/learned
    python launchers/evaluate.py --model runs:/<run id> --model runs:/<run id> --context 1024,4096 --yarn 4
    deepspeed --num_gpus 8 launchers/evaluate.py --model ... --model ...

Writes results.json, report.md and figures, and one MLflow run per model. The work lives in
vscale_plugin.apps.evaluate.
"""

from vscale_plugin.apps.evaluate import main

if __name__ == "__main__":
    main()
