"""Benchmark PTS's rollouts: sampling from the Megatron-Core model with its KV cache
(phi4.posttrain.generate) against a full forward at every new token (sample_tokens, the tests' reference),
on the tiny model in one process: completions/s and new tokens/s.

    python bench/pts_sampling.py [--samples 16] [--prompt 24] [--new 24] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=24)
    parser.add_argument("--new", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    from helpers import FP32, TopologyConfig, sample_tokens, tiny_model
    from phi4.model.build import build_phi4_model
    from phi4.posttrain.generate import MegatronPolicy
    from phi4.model.parallel import init_model_parallel

    model = tiny_model()
    topology = TopologyConfig()
    init_model_parallel(model, topology, FP32)
    chunks = build_phi4_model(model, topology, FP32)
    for chunk in chunks:
        chunk.eval()
    prefix = list(range(1000, 1000 + args.prompt))
    # eos never sampled: every completion runs the full --new tokens, so both do the same work
    policy = MegatronPolicy(chunks, model.vocab_size, eos_id=-1, max_new_tokens=args.new,
                            generator=torch.Generator().manual_seed(0))

    def cached():
        policy.sample(prefix, args.samples)

    def full():
        with torch.no_grad():
            sample_tokens(policy.logits, prefix, args.samples, args.new, 1.0, 1.0, None, torch.Generator().manual_seed(0))

    print(f"tiny model ({model.num_layers} layers, hidden {model.hidden_size}, vocabulary {model.vocab_size}), "
          f"{args.samples} completions of {args.new} tokens after a {args.prompt}-token prompt, "
          f"{torch.get_num_threads()} threads")
    for name, run in (("KV cache", cached), ("full forward", full)):
        run()  # warm-up
        started = time.perf_counter()
        for _ in range(args.repeats):
            run()
        seconds = (time.perf_counter() - started) / args.repeats
        print(f"{name:>12}: {seconds:.3f} s per batch | {args.samples / seconds:.1f} completions/s | "
              f"{args.samples * args.new / seconds:,.0f} new tokens/s")


if __name__ == "__main__":
    main()
