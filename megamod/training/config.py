"""A training run as nested dataclasses, read from a YAML recipe plus `key.sub=value` overrides.

Every key is checked when the file is read: an unknown or mistyped key is an error naming the file and the key
path, never ignored. Defaults that depend on the stage (learning rate, data kind, loss weights) stay None/empty
here and are taken from the stage table by the trainer.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

import yaml

from megamod.performance import PerformanceConfig
from megamod.training.stages import GROUPS, get_stage
from megamod.errors import ConfigError  # noqa: F401  (raised here, and by loading.data)


@dataclass
class DataSource:
    path: str | None = None  # a data file (JSON, JSONL, parquet); or, instead:
    weight: float = 1.0
    kind: str | None = None  # "conversations" | "pairs"; default from the stage
    template: str = "llava_mod"
    image_folder: str | None = None  # default: the file's directory (prefix: the one recorded at preprocessing)
    prefix: str | None = None  # a preprocessed data set (tools/preprocess_data.py --out PREFIX)


@dataclass
class DataConfig:
    train: list[DataSource] = field(default_factory=list)
    tokenizer: str | None = None  # default: the student checkpoint's tokenizer/ folder
    max_length: int = 2048  # text tokens, each <image> counted as its expanded positions
    num_workers: int = 0
    on_bad_sample: str = "error"  # or "skip" (every skipped sample is reported)
    seed: int = 0
    epoch_size: int | None = None  # samples per epoch; default: every sample of every source once
    group_by_length: bool = False  # sort each global batch by length into micro-batches (less padding)
    # "startup": every rank checks that every image file exists before training (one lookup per image: minutes
    # for millions on a network file system); "lazy": a missing image is a bad sample naming file:line when read
    check_images: str = "startup"


@dataclass
class OptimConfig:
    lr: float | None = None  # default: the stage's
    min_lr: float = 0.0
    warmup_fraction: float = 0.03
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    clip_grad: float = 1.0
    distributed_optimizer: bool = False
    initial_loss_scale: float = 2.0 ** 32  # fp16 only: megatron's dynamic loss scale starts here and halves on overflow


@dataclass
class LossConfig:
    weights: dict = field(default_factory=dict)  # overrides the stage's loss weights, e.g. {ce: 0.5}
    kd: str = "forward"  # "forward" KL(T||S) | "reverse" KL(S||T)
    temperature: float = 1.0
    preference: str = "dpo"  # "dpo" | "kto_pair"
    beta: float = 0.1
    # tokens per chunk of the memory-lean losses (megamod/losses/chunked.py; its DEFAULT_CHUNK_TOKENS); 0: the
    # unchunked reference losses, which hold ~16 bf16 logits tensors of fp32 intermediates
    chunk_tokens: int = 256


@dataclass
class ParallelSection:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int | None = None
    # Seconds a collective may wait for the other ranks: past it (a rank died or hangs) the run fails, naming the
    # step, instead of hanging. Every wait counts, so keep it above the slowest step and checkpoint write.
    timeout_s: float = 600.0


@dataclass
class ScheduleConfig:
    global_batch_size: int = 8
    micro_batch_size: int = 1
    steps: int | None = None  # default: one epoch (METHOD.md), epochs * samples / global batch
    epochs: float = 1.0


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between checkpoints; 0 = only at the end
    keep: int | None = 2  # newest complete checkpoints kept; None = all
    resume: bool = True
    # Signals that stop the run at the next step boundary with a checkpoint and exit status 75 (training/
    # preemption.py): SLURM's USR1 before the time limit (train.sbatch), SIGTERM on preemption or scancel.
    signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    # Write checkpoint files in a background process while training goes on (training/checkpoint_writers.py);
    # null: on where CUDA is available (training then waits only for the device-to-host copy), off on CPU.
    async_save: bool | None = None


@dataclass
class LogConfig:
    every: int = 1
    tensorboard: bool = True
    progress: bool = True


@dataclass
class TeacherCacheConfig:
    cache: str  # directory written by `megamod cache-teacher` (docs/TEACHER_CACHE.md); no teacher model is loaded


@dataclass
class RunConfig:
    stage: str
    student: str  # megamod checkpoint directory
    out: str  # run directory: checkpoints/, tensorboard/, model/ (the final student, input of the next stage)
    teacher: str | TeacherCacheConfig | None = None  # a checkpoint (online teacher) or {cache: DIR}
    trainable: list[str] | None = None  # parameter groups to train; default: the stage's (stages.GROUPS)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    performance: PerformanceConfig = field(default_factory=PerformanceConfig)  # megamod/performance.py
    seed: int = 1234
    dtype: str = "auto"  # bf16 on GPU, fp32 on CPU

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP")  # what checkpoint.signals may name


def _build(cls, value, where: str):
    """Build dataclass `cls` (or a typed value) from plain YAML data, naming `where` in every error."""
    if dataclasses.is_dataclass(cls):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in value
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"{where}: missing required key(s) {missing}")
        return cls(**{k: _build(hints[k], v, f"{where}.{k}") for k, v in value.items()})
    origin, args = typing.get_origin(cls), typing.get_args(cls)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if isinstance(value, dict):  # a section: the dataclass member of the union
            inner = [a for a in inner if dataclasses.is_dataclass(a)] or inner
        return _build(inner[0], value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_build(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if cls is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if cls is float and isinstance(value, str):
        try:  # YAML 1.1 reads 2e-5 (no dot) as a string
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if cls in (int, float, str, bool, dict) and not isinstance(value, cls) or (cls is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {cls.__name__}, got {value!r}")
    return value


def apply_override(raw: dict, override: str) -> None:
    """`a.b.c=value` (value parsed as YAML) into the nested dict `raw`."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not key.path=value")
    key, text = override.split("=", 1)
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(text)


def load_config(path: str | None = None, overrides: list[str] = (), base: dict | None = None) -> RunConfig:
    raw = dict(base or {})
    if path is not None:
        with open(path) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the recipe must be a mapping of sections")
        raw.update(loaded)
    for o in overrides:
        apply_override(raw, o)
    cfg = _build(RunConfig, raw, path or "config")
    return validate(cfg, path or "config")


def validate(cfg: RunConfig, where: str = "config") -> RunConfig:
    stage = get_stage(cfg.stage)
    if stage.teacher and not cfg.teacher:
        raise ConfigError(f"{where}: stage {cfg.stage} needs a teacher checkpoint (teacher: DIR)")
    if isinstance(cfg.teacher, TeacherCacheConfig) and (cfg.loss.kd != "forward" or cfg.loss.temperature != 1.0):
        raise ConfigError(f"{where}: a cached teacher (teacher.cache) holds temperature-1 top-k log-probs: it supports "
                          f"loss.kd=forward and loss.temperature=1 only (got {cfg.loss.kd}, {cfg.loss.temperature})")
    if cfg.trainable is not None:
        unknown = sorted(set(cfg.trainable) - set(GROUPS))
        if unknown or not cfg.trainable:
            raise ConfigError(f"{where}: trainable {cfg.trainable} must name groups among {list(GROUPS)}")
    if not cfg.data.train:
        raise ConfigError(f"{where}: data.train lists no data files")
    for i, source in enumerate(cfg.data.train):
        if (source.path is None) == (source.prefix is None):
            raise ConfigError(f"{where}: data.train[{i}] needs exactly one of path (a data file) or prefix (a data set "
                              f"preprocessed by tools/preprocess_data.py), got path={source.path!r}, "
                              f"prefix={source.prefix!r}")
    s = cfg.schedule
    if s.micro_batch_size < 1 or s.global_batch_size % s.micro_batch_size:
        raise ConfigError(f"{where}: schedule.global_batch_size {s.global_batch_size} is not a multiple of "
                          f"micro_batch_size {s.micro_batch_size}")
    if cfg.loss.kd not in ("forward", "reverse"):
        raise ConfigError(f"{where}: loss.kd must be forward or reverse, got {cfg.loss.kd!r}")
    if cfg.loss.preference not in ("dpo", "kto_pair"):
        raise ConfigError(f"{where}: loss.preference must be dpo or kto_pair, got {cfg.loss.preference!r}")
    ct = cfg.loss.chunk_tokens
    if isinstance(ct, bool) or not isinstance(ct, int) or ct < 0:
        raise ConfigError(f"{where}: loss.chunk_tokens must be a whole number of tokens >= 0 (0: the unchunked "
                          f"reference losses), got {ct!r}")
    unknown = set(cfg.loss.weights) - {"ce", "kd", "preference"}
    if unknown:
        raise ConfigError(f"{where}: loss.weights has unknown losses {sorted(unknown)} (ce, kd, preference)")
    if cfg.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"{where}: dtype must be auto, float32, bfloat16 or float16, got {cfg.dtype!r}")
    if not cfg.optim.initial_loss_scale > 0:
        raise ConfigError(f"{where}: optim.initial_loss_scale must be positive, got {cfg.optim.initial_loss_scale}")
    unknown = [n for n in cfg.checkpoint.signals if n not in STOP_SIGNALS]
    if unknown or len(set(cfg.checkpoint.signals)) != len(cfg.checkpoint.signals):
        raise ConfigError(f"{where}: checkpoint.signals {cfg.checkpoint.signals} must name distinct signals among "
                          f"{list(STOP_SIGNALS)}")
    if not cfg.parallel.timeout_s > 0:
        raise ConfigError(f"{where}: parallel.timeout_s must be a positive number of seconds, got "
                          f"{cfg.parallel.timeout_s}")
    if cfg.data.on_bad_sample not in ("error", "skip"):
        raise ConfigError(f"{where}: data.on_bad_sample must be error or skip")
    if cfg.data.check_images not in ("startup", "lazy"):
        raise ConfigError(f"{where}: data.check_images must be startup or lazy, got {cfg.data.check_images!r}")
    return cfg


def loss_weights(cfg: RunConfig) -> dict:
    """The stage's loss weights with the recipe's overrides; zero-weight losses are dropped."""
    weights = {**get_stage(cfg.stage).losses, **cfg.loss.weights}
    return {k: float(v) for k, v in weights.items() if v}
