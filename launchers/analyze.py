"""Gradient-sink statistics of an existing model, post hoc (issue 4; SPEC sections 2 and 4).

    python launchers/analyze.py --model checkpoints/smoke-learned-... --dataset smoke
    deepspeed --num_gpus 8 launchers/analyze.py --model meta-llama/Llama-3.1-8B --dataset c4 \\
        --ds_config ds_configs/zero3.json --batches 4 --batch_size 2 --seq_len 2048

Prints a per-layer table and logs the metrics to MLflow. The work lives in vscale_plugin.apps.analyze.
"""

from vscale_plugin.apps.analyze import main

if __name__ == "__main__":
    main()
