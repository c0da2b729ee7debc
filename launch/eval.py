"""Hydra entry point for torchrun/srun: `torchrun --nproc-per-node 2 launch/eval.py checkpoint=runs/sft topology.tp=2`."""

from phi4.cli.eval import main

if __name__ == "__main__":
    main()
