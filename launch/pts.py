"""Hydra entry point for torchrun/srun: `torchrun --nproc-per-node 2 launch/pts.py pts.checkpoint=runs/sft`."""

from phi4.posttrain.pts_cli import main

if __name__ == "__main__":
    main()
