"""Entry point for torchrun/srun: `torchrun --nproc-per-node 2 launch/harness.py --model_args checkpoint=runs/sft,tp=2 --tasks mmlu`."""

from phi4.cli.harness import main

if __name__ == "__main__":
    main()
