"""Hydra entry point for torchrun/srun: `torchrun --nproc-per-node 2 launch/train.py topology.tp=2`."""

from phi4.cli.train import main

if __name__ == "__main__":
    main()
