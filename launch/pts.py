"""Hydra entry point for torchrun/srun: `torchrun --nproc-per-node 2 launch/pts.py pts.checkpoint=runs/sft`."""

from phi4.cli.pts import main

if __name__ == "__main__":
    main()
