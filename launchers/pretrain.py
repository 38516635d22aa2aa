"""Pretrain with or without V-scale under DeepSpeed, logged to MLflow.

    deepspeed launchers/pretrain.py --ds_config ds_configs/zero2.json            # smoke preset, offline
    deepspeed --num_gpus 8 launchers/pretrain.py --ds_config ds_configs/zero2.json --preset 0.1B --dataset c4

Flags: SPEC section 6, or --help. The work lives in vscale_plugin.train.
"""

from vscale_plugin.train.main import main

if __name__ == "__main__":
    main()
