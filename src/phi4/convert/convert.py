"""The two conversions, each streamed one tensor at a time into a directory that appears only
when complete.

- `hf_to_mcore`: HF Phi3ForCausalLM safetensors -> Megatron-Core torch_dist checkpoint (weights
  only, the model config in its common state), loadable under any TP/PP/VP layout.
- `mcore_to_hf`: any torch_dist checkpoint of this project (any layout, optimizer state or not)
  -> config.json, generation_config.json, sharded safetensors with their index, tokenizer files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from tqdm import tqdm

from phi4.checkpoint.weights import MODEL_CONFIG_KEY
from phi4.convert.hf_config import check_same_model, generation_config, hf_config, model_config_from_hf
from phi4.convert.mcore_checkpoint import CheckpointReader, CheckpointWriter
from phi4.convert.safetensors_io import HFCheckpointReader, ShardedSafetensorsWriter
from phi4.convert.tokenizer_export import write_tokenizer
from phi4.errors import ConfigError
from phi4.model.config import ModelConfig
from phi4.model.hf_weights import checkpoint_layout, hf_shapes, hf_to_mcore_full, mcore_full_to_hf

DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16"}


@contextlib.contextmanager
def atomic_directory(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary directory beside `target`, renamed to it only when the block succeeds; on any
    failure it is removed, so nothing half-written ever looks like a finished checkpoint."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise ConfigError(f"{target} already exists; choose another --out or pass --overwrite")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, old)
        os.replace(partial, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, target)


class Progress:
    """A progress bar over bytes converted, on stderr."""

    def __init__(self, total_bytes: int, label: str, enabled: bool = True):
        self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=label, file=sys.stderr,
                        disable=not enabled, mininterval=1.0)

    def add(self, tensor: torch.Tensor) -> None:
        self.bar.update(tensor.numel() * tensor.element_size())

    def close(self) -> None:
        self.bar.close()


def _check_hf_tensors(reader: HFCheckpointReader, model: ModelConfig, source: Path) -> None:
    expected = hf_shapes(model)
    present = set(reader.names())
    missing = [n for n in expected if n not in present]
    unknown = sorted(present - set(expected))
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {', '.join(missing[:3])}")
        if unknown:
            parts.append(f"{len(unknown)} unknown tensor(s), e.g. {', '.join(unknown[:3])}")
        raise ConfigError(f"{source}: not a Phi-4 (Phi3ForCausalLM) checkpoint of this config: {'; '.join(parts)}")
    for name, shape in expected.items():
        if reader.shape(name) != shape:
            raise ConfigError(f"{source}: {name} has shape {reader.shape(name)}, the config needs {shape}")


def hf_to_mcore(hf_dir: Path, out: Path, model: Optional[ModelConfig] = None, dtype: Optional[torch.dtype] = None,
                overwrite: bool = False, progress: bool = True, before_commit: Optional[Callable] = None) -> ModelConfig:
    """`before_commit(model, written_dir)` runs on the complete output before it is renamed into
    place (verification); if it raises, nothing is left behind."""
    hf_dir = Path(hf_dir)
    derived = model_config_from_hf(hf_dir / "config.json")
    if model is not None:
        check_same_model(model, derived, str(hf_dir / "config.json"))
    model = model or derived
    reader = HFCheckpointReader(hf_dir)
    _check_hf_tensors(reader, model, hf_dir)

    writer = CheckpointWriter()
    total = 0
    for key, hf_name, rule, piece_shape, layer in checkpoint_layout(model):
        out_dtype = dtype or reader.dtype(hf_name)
        total += torch.Size(piece_shape).numel() * out_dtype.itemsize

        def produce(hf_name=hf_name, rule=rule):
            return hf_to_mcore_full(reader.read(hf_name), rule, model)

        writer.add(key, piece_shape, out_dtype, layer, model.num_layers, produce)

    bar = Progress(total, "hf -> mcore", progress)
    common = {MODEL_CONFIG_KEY: dataclasses.asdict(model), "converted_from": str(hf_dir)}
    with atomic_directory(out, overwrite) as partial:
        writer.write(partial, common, on_write=lambda key, t: bar.add(t))
        bar.close()
        if before_commit:
            before_commit(model, partial)
    return model


def checkpoint_model_config(reader: CheckpointReader) -> Optional[ModelConfig]:
    values = reader.common_state().get(MODEL_CONFIG_KEY)
    return ModelConfig.from_dict(values) if values else None


def _check_checkpoint_tensors(reader: CheckpointReader, model: ModelConfig) -> None:
    for key, _, rule, piece_shape, layer in checkpoint_layout(model):
        shape = reader.shape(key)
        expected = piece_shape if layer is None else (model.num_layers, *piece_shape)
        if rule == "vocab":  # padded rows may differ with the layout it was trained at
            ok = shape[0] >= model.vocab_size and shape[1:] == expected[1:]
        else:
            ok = shape == expected
        if not ok:
            raise ConfigError(f"{reader.dir}: {key} has shape {shape}, the model config needs {expected}")


def mcore_to_hf(ckpt: Path, out: Path, model: Optional[ModelConfig] = None, dtype: Optional[torch.dtype] = None,
                max_shard_bytes: int = 2 * 1024**3, overwrite: bool = False, progress: bool = True,
                before_commit: Optional[Callable] = None) -> ModelConfig:
    reader = CheckpointReader(Path(ckpt))
    stored = checkpoint_model_config(reader)
    if model is not None and stored is not None:
        check_same_model(model, stored, f"{ckpt} (its saved model config)")
    model = model or stored
    if model is None:
        raise ConfigError(f"{ckpt} holds no model config; pass --model (a name in conf/model or a yaml file)")
    _check_checkpoint_tensors(reader, model)

    layout = checkpoint_layout(model)
    out_dtype = {hf_name: dtype or reader.dtype(key) for key, hf_name, *_ in layout}
    plan = [(name, shape, out_dtype[name]) for name, shape in hf_shapes(model).items()]
    dtypes = {d for d in out_dtype.values()}
    dtype_name = DTYPE_NAMES[torch.bfloat16 if torch.bfloat16 in dtypes else dtypes.pop()]

    with atomic_directory(out, overwrite) as partial:
        writer = ShardedSafetensorsWriter(partial, plan, max_shard_bytes)
        bar = Progress(writer.total_bytes, "mcore -> hf", progress)
        # One read per layer: every key of the layer together.
        groups: dict[Optional[int], list] = {}
        for entry in layout:
            groups.setdefault(entry[4], []).append(entry)
        for layer, entries in groups.items():
            if layer is None:  # whole tensors, one at a time (the embeddings are the largest)
                batches = [[e] for e in entries]
            else:
                batches = [entries]
            for batch in batches:
                loaded = reader.read([(key, layer) for key, *_ in batch])
                for key, hf_name, rule, _, _ in batch:
                    tensor = mcore_full_to_hf(loaded[(key, layer)], rule, model).to(out_dtype[hf_name])
                    writer.write(hf_name, tensor)
                    bar.add(tensor)
                del loaded
        writer.finish()
        bar.close()
        (partial / "config.json").write_text(json.dumps(hf_config(model, dtype_name), indent=2) + "\n")
        (partial / "generation_config.json").write_text(json.dumps(generation_config(model), indent=2) + "\n")

        write_tokenizer(partial, model.max_position_embeddings)
        if before_commit:
            before_commit(model, partial)
    return model
