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
class TeacherParallel:
    tp: int = 1
    pp: int = 1


@dataclass
class TeacherRanksConfig:
    """The teacher on its own ranks (megamod/training/teacher_ranks): the first `ranks` ranks of the job run the frozen teacher
    at its own layout, forward only, and send each student data-parallel rank its rows; the other ranks train the
    student at `parallel`. `send`: "topk" (the `topk` most likely ids' log-probs + tail mass, as a teacher cache
    holds them, in `dtype`) or "full" (the log-probs of every id: exact KD, any loss.kd and temperature)."""

    ckpt: str
    ranks: int
    parallel: TeacherParallel = field(default_factory=TeacherParallel)
    send: str = "topk"
    topk: int = 64
    dtype: str = "bfloat16"  # of the top-k log-probs sent (float32 | bfloat16)


TEACHER_SENDS = ("topk", "full")


@dataclass
class RunConfig:
    stage: str
    student: str  # megamod checkpoint directory
    out: str  # run directory: checkpoints/, tensorboard/, model/ (the final student, input of the next stage)
    # a checkpoint (online teacher, riding on the student's ranks), {cache: DIR} (offline) or {ckpt: DIR, ranks: N,
    # ...} (online on its own ranks)
    teacher: str | TeacherCacheConfig | TeacherRanksConfig | None = None
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
        if isinstance(value, dict):  # a section: the dataclass member of the union its keys name
            sections = [a for a in inner if dataclasses.is_dataclass(a)]
            fitting = [a for a in sections if set(value) <= {f.name for f in dataclasses.fields(a)}]
            if len(sections) > 1 and not fitting:
                forms = " or ".join("{" + ", ".join(f.name for f in dataclasses.fields(a)) + "}" for a in sections)
                raise ConfigError(f"{where}: keys {sorted(value)} fit none of its forms: {forms}")
            inner = fitting or sections or inner
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
    if isinstance(cfg.teacher, TeacherRanksConfig):
        _validate_teacher_ranks(cfg, where)
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


def _validate_teacher_ranks(cfg: RunConfig, where: str) -> None:
    t = cfg.teacher
    if not get_stage(cfg.stage).teacher:
        raise ConfigError(f"{where}: stage {cfg.stage} has no teacher; teacher.ranks is for d2d, d2s and preference")
    if isinstance(t.ranks, bool) or t.ranks < 1:
        raise ConfigError(f"{where}: teacher.ranks must be >= 1, got {t.ranks!r}")
    for name in ("tp", "pp"):
        value = getattr(t.parallel, name)
        if isinstance(value, bool) or value < 1:
            raise ConfigError(f"{where}: teacher.parallel.{name} must be >= 1, got {value!r}")
    if t.ranks % (t.parallel.tp * t.parallel.pp):
        raise ConfigError(f"{where}: teacher.ranks {t.ranks} is not a multiple of teacher.parallel tp*pp = "
                          f"{t.parallel.tp}*{t.parallel.pp}")
    if t.send not in TEACHER_SENDS:
        raise ConfigError(f"{where}: teacher.send must be one of {list(TEACHER_SENDS)}, got {t.send!r}")
    if t.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"{where}: teacher.dtype must be float32 or bfloat16, got {t.dtype!r}")
    if t.send == "topk" and not get_stage(cfg.stage).pairs:
        if isinstance(t.topk, bool) or t.topk < 1:
            raise ConfigError(f"{where}: teacher.topk must be >= 1, got {t.topk!r}")
        if cfg.loss.kd != "forward" or cfg.loss.temperature != 1.0:
            raise ConfigError(f"{where}: teacher.send=topk sends temperature-1 top-k log-probs: it supports "
                              f"loss.kd=forward and loss.temperature=1 only (got {cfg.loss.kd}, "
                              f"{cfg.loss.temperature}); use teacher.send=full")


def loss_weights(cfg: RunConfig) -> dict:
    """The stage's loss weights with the recipe's overrides; zero-weight losses are dropped."""
    weights = {**get_stage(cfg.stage).losses, **cfg.loss.weights}
    return {k: float(v) for k, v in weights.items() if v}
