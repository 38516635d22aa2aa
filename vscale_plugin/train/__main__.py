"""``python -m vscale_plugin.train`` and ``deepspeed --module vscale_plugin.train``: the pretraining launcher, the
same as the ``vsp-pretrain`` command and ``launchers/pretrain.py``."""

from vscale_plugin.train.main import main

if __name__ == "__main__":
    main()
