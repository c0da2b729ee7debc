"""Typed settings of every config group, registered with Hydra's ConfigStore as schemas.

Each group's YAML files start their defaults list with `/schema@_here_: <group>` (and the primary
configs place `train`, `checkpoint`, `pts`, `plan`, `stage`, the dpo stages `dpo`, the same way),
so Hydra composes every group onto one of these dataclasses: a value of the wrong type
(`train.steps=abc`, `optim.lr=x`, `train.micro_batch_size=2.5`) or a key that is not a field
(`train.stepz=3`, even with `+`) is refused at composition, before any of our code runs; the entry
points print the refusal as one line with exit code 2 (`phi4.logs.one_line_config_errors`).

Ranges live beside the fields (`number(...)`) and `check_ranges` runs them, once, before any
process group: one line naming the setting, its value and what would be valid. The model,
topology, precision and hardware schemas are the unfrozen twins of the frozen dataclasses the code
builds from (`phi4.model.config`, `phi4.runtime.hardware`), so a field is declared once.

`register()` runs at import: every entry point, and anything that composes these configs
(tests, phi4-plan), imports this module first.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from phi4.errors import ConfigError, deprecated_setting
from phi4.model.config import FP8Config, ModelConfig, PrecisionConfig, TopologyConfig
from phi4.runtime.hardware import HardwareConfig


def number(default: Any = MISSING, at_least: Optional[float] = None, above: Optional[float] = None,
           below: Optional[float] = None, at_most: Optional[float] = None, meaning: str = ""):
    """A numeric field with its valid range, each bound named for what it allows: `at_least` and
    `at_most` include the bound, `above` and `below` exclude it."""
    if (at_least is None) == (above is None):
        raise TypeError("number(): give exactly one lower bound, at_least= or above=")
    return field(default=default, metadata=dict(at_least=at_least, above=above, below=below, at_most=at_most,
                                                meaning=meaning))


@dataclass
class Train:
    objective: str = MISSING  # lm | dpo
    steps: Optional[int] = number(at_least=1, meaning="optimizer steps; or null to derive them from train.token_budget")
    token_budget: Optional[float] = number(at_least=1, meaning="tokens to train on (used when train.steps is null)")
    seq_length: int = number(at_least=1, meaning="tokens per sample")
    micro_batch_size: int = number(at_least=1, meaning="samples per micro-batch")
    global_batch_size: int = number(at_least=1, meaning="samples per optimizer step")
    log_every: int = number(at_least=1, meaning="steps between training lines")
    valid_every: int = number(at_least=0, meaning="steps between validation losses; 0 never")
    valid_samples: int = number(at_least=0, meaning="validation samples")
    valid_per_source: bool = True  # with several data sources: each one's validation loss beside the blend's
    max_wall_minutes: Optional[float] = number(above=0, meaning="minutes before a resumable stop")
    exit_interval: Optional[int] = number(at_least=1, meaning="steps between resumable stops")
    max_nonfinite_in_a_row: int = number(at_least=1, meaning="skipped steps in a row before the run stops")
    overlap_grad_reduce: bool = MISSING
    overlap_param_gather: bool = MISSING
    grad_reduce_in_fp32: bool = True
    peak_tflops: Optional[float] = number(above=0, meaning="the device's dense peak, for MFU")
    tensorboard: bool = MISSING
    hang_timeout_minutes: Optional[float] = number(above=0, meaning="minutes a step may take before "
                                                   "every rank writes its stacks and exits 76; null: no watchdog")
    hang_startup_minutes: float = number(above=0, meaning="minutes from start to the first step's end")
    hang_save_minutes: float = number(above=0,
                                      meaning="minutes a checkpoint save or an evaluation may take")
    straggler_factor: Optional[float] = number(above=1, meaning="a rank this many times slower than "
                                               "the median is named; null: never")
    straggler_windows: int = number(at_least=1, meaning="log windows in a row a rank is slow before it is named")
    spike_sigmas: Optional[float] = number(above=0, meaning="standard deviations above the recent "
                                           "mean that make a loss a spike; null: no spike handling")
    spike_window: int = number(at_least=2, meaning="the recent steps whose losses a spike is measured against")
    spike_action: str = MISSING  # skip | rewind
    # deprecated aliases (one release): `typed` moves a value set here to its new name, warning once
    eval_every: Optional[int] = number(default=None, at_least=0, meaning="deprecated: train.valid_every")
    eval_samples: Optional[int] = number(default=None, at_least=0, meaning="deprecated: train.valid_samples")


@dataclass
class Optim:
    lr: float = number(above=0, meaning="the peak learning rate")
    min_lr: float = number(at_least=0, meaning="the final learning rate")
    warmup_steps: int = number(at_least=0, meaning="warm-up steps")
    decay_style: str = MISSING  # linear | cosine | constant | wsd
    wsd_decay_fraction: float = number(0.1, above=0, at_most=1,
                                       meaning="wsd: the last share of the steps spent decaying")
    wsd_decay_style: str = "linear"  # wsd's decay: linear | cosine | exponential | minus_sqrt
    override_scheduler: bool = False  # resume on these schedule settings instead of refusing a change
    weight_decay: float = number(at_least=0, meaning="decoupled weight decay")
    adam_beta1: float = number(at_least=0, below=1, meaning="Adam's first-moment decay")
    adam_beta2: float = number(at_least=0, below=1, meaning="Adam's second-moment decay")
    adam_eps: float = number(above=0, meaning="Adam's epsilon")
    clip_grad: float = number(at_least=0, meaning="the gradient norm clip; 0 off")


@dataclass
class Checkpoint:
    every: int = number(at_least=0, meaning="steps between checkpoints; 0 saves only at the end")
    keep: int = number(at_least=1, meaning="the newest checkpoints kept; the one just written is always kept")
    async_save: bool = MISSING
    load: Optional[str] = None
    allow_new_batch_shape: bool = False


@dataclass
class Source:
    name: str = MISSING
    path: Any = MISSING  # an indexed-dataset prefix; data.format=gpt: also a glob or a list of shard prefixes
    weight: float = number(above=0, meaning="the source's share of the blend")
    generate: Optional[Dict[str, Any]] = None  # the bundled synthetic corpora: made when missing


@dataclass
class Data:
    format: str = MISSING  # gpt | packed_chat | preference
    cache_dir: str = MISSING
    root: Optional[str] = None
    synthetic: Optional[Dict[str, Any]] = None
    pairs: Optional[str] = MISSING  # the preference JSONL (data=preference); a `???` merged onto None would not stick
    sources: List[Source] = field(default_factory=list)
    split: str = MISSING


@dataclass
class Fault:
    """Faults injected on purpose, for the tests of what a run does about them (all off by default)."""

    hang_step: Optional[int] = number(default=None, at_least=1, meaning="the step inside which fault.hang_rank sleeps")
    hang_rank: int = number(default=0, at_least=0, meaning="the rank that sleeps inside fault.hang_step")
    hang_seconds: float = number(default=3600.0, above=0, meaning="how long it sleeps")
    delay_rank: Optional[int] = number(default=None, at_least=0, meaning="a rank slowed in every step")
    delay_seconds: float = number(default=0.0, at_least=0, meaning="how long fault.delay_rank sleeps in every step")
    corrupt_sample: Optional[int] = number(default=None, at_least=0, meaning="the batch holding this sample gets "
                                           "random labels")


@dataclass
class Profile:
    """A window of steps profiled (Megatron-LM's --profile, --profile-step-start/end, --profile-ranks)."""

    kind: str = "none"  # none | torch (a Chrome/TensorBoard trace) | nsys (a CUDA profiler capture range)
    first_step: int = number(default=11, at_least=1, meaning="the first step profiled")
    last_step: int = number(default=12, at_least=1, meaning="the last step profiled")
    ranks: List[int] = field(default_factory=lambda: [0])  # the ranks that profile; [] every rank
    record_shapes: bool = False  # torch: operators' input shapes; nsys: NVTX ranges with shapes (emit_nvtx)
    with_stack: bool = False  # torch: Python stacks of each operator
    memory_snapshot_on_oom: bool = False  # CUDA: the allocator's history kept, dumped on an out-of-memory error


@dataclass
class Tracking:
    """Experiment trackers fed the same records as metrics.jsonl, from the rank that logs (each off by default)."""

    run_name: Optional[str] = None  # the trackers' run name; null: the stage's name and the run directory's
    wandb: bool = False
    wandb_project: str = "phi4"
    wandb_entity: Optional[str] = None
    wandb_mode: Optional[str] = None  # online | offline | disabled; null: W&B's own (WANDB_MODE, its login)
    mlflow: bool = False
    mlflow_tracking_uri: Optional[str] = None  # null: MLflow's own (MLFLOW_TRACKING_URI, else ./mlruns)
    mlflow_experiment: str = "phi4"


@dataclass
class Dpo:
    beta: float = number(above=0, meaning="the DPO temperature")
    reference: Optional[str] = None


@dataclass
class Eval:
    every: int = number(at_least=0, meaning="steps between generative evaluations; 0 never")
    tasks: List[str] = field(default_factory=list)
    synthetic: Optional[Dict[str, Any]] = None
    template: str = MISSING
    checker: str = MISSING
    samples: int = number(at_least=1, meaning="completions per problem")
    pass_at: List[int] = field(default_factory=lambda: [1])
    temperature: float = number(at_least=0, meaning="sampling temperature; 0 greedy")
    top_p: float = number(above=0, at_most=1, meaning="nucleus sampling's probability mass")
    max_new_tokens: int = number(at_least=1, meaning="tokens generated per answer")
    batch_size: int = number(at_least=1, meaning="problems per decoding batch")
    stop: List[str] = field(default_factory=list)


@dataclass
class Pts:
    checkpoint: str = MISSING
    problems: Optional[str] = None
    generate: Optional[Dict[str, Any]] = None
    checker: str = MISSING
    samples: int = number(at_least=1, meaning="completions per success estimate")
    p_gap: float = number(above=0, at_most=1, meaning="the least move of p(success) at a pivotal token")
    p_min: float = number(at_least=0, at_most=1, meaning="the least p(success) of a kept query")
    p_max: float = number(at_least=0, at_most=1, meaning="the largest p(success) of a kept query")
    max_new_tokens: int = number(at_least=1, meaning="tokens generated per completion")
    temperature: float = number(at_least=0, meaning="sampling temperature")
    top_p: float = number(above=0, at_most=1, meaning="nucleus sampling's probability mass")
    output: str = MISSING


@dataclass
class Plan:
    gpus: Optional[int] = number(at_least=1, meaning="devices; or null: topology.nodes x topology.gpus_per_node")
    mfu: Optional[float] = number(above=0, at_most=1, meaning="an achieved model FLOPs utilisation")
    memory_margin: float = number(at_least=0, below=1, meaning="the share added to the estimated activations")
    top: int = number(at_least=1, meaning="layouts printed by --search")
    show_rejected: bool = False
    micro_batch_sizes: List[int] = field(default_factory=lambda: [1])
    recompute: List[str] = field(default_factory=lambda: ["none"])
    save_seconds: Optional[float] = number(default=None, above=0,
                                           meaning="seconds a checkpoint save stops training, for the save interval")
    save_from: Optional[str] = None  # a phi4-train run directory: its measured saves give the save time


@dataclass
class Stage:
    name: str = MISSING


def _unfrozen(cls: type, renamed: tuple[str, ...] = (), **nested: type) -> type:
    """A mutable twin of a frozen settings dataclass (Hydra merges overrides into its nodes), with
    the same fields, types and defaults; `nested` swaps a field's dataclass for its twin; each
    `renamed` key is an optional field more, a deprecated name `typed` moves to its new one."""
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        kind = Optional[nested[f.name]] if f.name in nested else hints[f.name]
        default = None if f.name in nested else (f.default if f.default is not dataclasses.MISSING else MISSING)
        fields.append((f.name, kind, field(default=default)))
    fields += [(old, Optional[Any], field(default=None)) for old in renamed]
    return dataclasses.make_dataclass(cls.__name__, fields, namespace={"__module__": __name__})


FP8 = _unfrozen(FP8Config)
SCHEMAS: dict[str, type] = {
    "train": Train, "optim": Optim, "checkpoint": Checkpoint, "data": Data, "fault": Fault, "profile": Profile, "tracking": Tracking,
    "dpo": Dpo, "eval": Eval,
    "pts": Pts, "plan": Plan, "stage": Stage,
    "model": _unfrozen(ModelConfig, renamed=("backend",)), "topology": _unfrozen(TopologyConfig),
    "precision": _unfrozen(PrecisionConfig, fp8=FP8), "hardware": _unfrozen(HardwareConfig),
}


def multirun_job_dir_or(single: str) -> str:
    """`${multirun_job_dir_or:DIR}`, run_dir's default: DIR for a single run; in each job of a
    multirun (`-m`, locally or through the submitit launcher) the job's own directory, Hydra's
    hydra.sweep.dir/hydra.sweep.subdir (the job's number unless set), so that no two jobs of a sweep
    write, or resume from, one another's checkpoints."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return HydraConfig.get().runtime.output_dir  # set by Hydra's run_job for this job
    return single


def register() -> None:
    store = ConfigStore.instance()
    for name, schema in SCHEMAS.items():
        store.store(group="schema", name=name, node=schema)
    OmegaConf.register_new_resolver("multirun_job_dir_or", multirun_job_dir_or, replace=True)


def load_group(group: str, path) -> dict:
    """One group's YAML file read alone, without Hydra (a `--model` file, a benchmark's shapes):
    its `defaults` list dropped, its values typed by the group's schema; a key that is not a
    setting, a value of the wrong type or a required one missing is one ConfigError naming the file."""
    try:
        values = OmegaConf.load(path)
        if "defaults" in values:
            del values["defaults"]
        typed = OmegaConf.merge(OmegaConf.structured(SCHEMAS[group]), values)
        return _renamed(group, OmegaConf.to_container(typed, resolve=True, throw_on_missing=True))
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise ConfigError(f"{path}: {str(err).splitlines()[0]}{f' ({group}.{key})' if key else ''}") from err


# The groups whose code-side type is a frozen dataclass (the schema registered with Hydra is its
# unfrozen twin): built from the plain values, each checked by its own `from_dict`.
FROZEN: dict[str, type] = {"model": ModelConfig, "topology": TopologyConfig, "precision": PrecisionConfig,
                           "hardware": HardwareConfig}


# Settings renamed, by group: old field -> new field (each old one a field of the schema for one release).
RENAMED: dict[str, dict[str, str]] = {"train": {"eval_every": "valid_every", "eval_samples": "valid_samples"},
                                      "model": {"backend": "transformer_impl"}}


def _renamed(group: str, settings):
    """A value given under a deprecated name moves to the new name (it wins: it is what the user
    wrote); `settings` is the schema's instance, or a frozen group's plain dict (the old key dropped)."""
    plain = isinstance(settings, dict)
    for old, new in RENAMED.get(group, {}).items():
        value = settings.get(old) if plain else getattr(settings, old)
        if value is not None:
            deprecated_setting(f"{group}.{old}", f"{group}.{new}", value)
            if plain:
                settings[new] = value
            else:
                setattr(settings, new, value)
                setattr(settings, old, None)
        if plain:
            settings.pop(old, None)
    return settings


def typed(cfg: DictConfig, group: str):
    """The one way from a composed config's group to its typed settings: an instance of the
    group's schema (`SCHEMAS`), or for model, topology, precision and hardware of the frozen
    dataclass the code builds from. An absent group gives the schema's defaults (fault: no
    faults). `data.pairs`, left `???` where no preference file is named, becomes None."""
    node = cfg.get(group)
    if group in FROZEN:
        return FROZEN[group].from_dict(_renamed(group, OmegaConf.to_container(node, resolve=True)))
    if node is None:
        return SCHEMAS[group]()
    if group == "data" and OmegaConf.is_missing(node, "pairs"):
        node = node.copy()
        node.pairs = None
    if OmegaConf.get_type(node) is not SCHEMAS[group]:  # composed without the schema (a hand-made config)
        node = OmegaConf.merge(OmegaConf.structured(SCHEMAS[group]), node)
    return _renamed(group, OmegaConf.to_object(node))


@dataclass(frozen=True)
class RunSettings:
    """Every group a training run reads, typed (`typed`), with the run's seed and directory."""

    train: Train
    optim: Optim
    checkpoint: Checkpoint
    data: Data
    fault: Fault
    profile: Profile
    tracking: Tracking
    model: ModelConfig
    topology: TopologyConfig
    precision: PrecisionConfig
    seed: int
    run_dir: Path

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "RunSettings":
        groups = ("train", "optim", "checkpoint", "data", "fault", "profile", "tracking", "model", "topology",
                  "precision")
        return cls(**{g: typed(cfg, g) for g in groups}, seed=cfg.seed, run_dir=Path(cfg.run_dir))


def check_ranges(cfg: DictConfig, groups: tuple[str, ...]) -> None:
    """Each number of these groups within its field's range, and no key that is not a field (one
    appended with `+`); each refusal is one line naming the setting, its value and what would be
    valid (types were checked at composition)."""
    for group in groups:
        node = cfg.get(group)
        if node is None:
            continue
        fields = [f.name for f in dataclasses.fields(SCHEMAS[group])]
        extra = [key for key in node if key not in fields]
        if extra:
            raise ConfigError(f"{group}.{extra[0]} is not a setting; valid: {', '.join(fields)}")
        for f in dataclasses.fields(SCHEMAS[group]):
            if "at_least" not in f.metadata:
                continue
            value = OmegaConf.select(node, f.name, default=None)
            if value is None or OmegaConf.is_missing(node, f.name):
                continue
            _check_number(f"{group}.{f.name}", value, f, typing.get_type_hints(SCHEMAS[group])[f.name])
        if group == "data":
            weight = next(f for f in dataclasses.fields(Source) if f.name == "weight")
            for i, source in enumerate(node.get("sources") or []):
                _check_number(f"data.sources[{i}].weight", source.weight, weight, float)


def _check_number(name: str, value, f: dataclasses.Field, kind) -> None:
    at_least, above, below, at_most = (f.metadata[k] for k in ("at_least", "above", "below", "at_most"))
    whole = kind is int or int in typing.get_args(kind)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > above if above is not None else value >= at_least) and (below is None or value < below) \
            and (at_most is None or value <= at_most)
    if not ok:
        bounds = f"above {above}" if above is not None else f"at least {at_least}"
        bounds += f" and below {below}" if below is not None else ""
        bounds += f" and at most {at_most}" if at_most is not None else ""
        raise ConfigError(f"{name}={value!r}; valid: {'a whole number' if whole else 'a number'} {bounds} "
                          f"({f.metadata['meaning']})")


register()
