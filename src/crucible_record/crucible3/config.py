"""RunConfig: every constant of the Crucible-3 notebook, validated, with the notebook's defaults."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import platform
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import CrucibleError

DEVICES = ("auto", "cpu", "cuda", "mps")

# --record NAME,...: the Crucible-2 data, recorded beside W (off by default). name -> field name.
RECORDABLE = {"grad": "W_grad", "exp_avg": "W_exp_avg", "exp_avg_sq": "W_exp_avg_sq"}
RECORD_ROWS = ("all", "dead", "live")  # --record-rows: which tokens' rows of those fields are kept

# --preset NAME: RunConfig values that a config file and flags override. "quick": the notebook's
# model and 500 steps on a smaller batch (16 x 64 tokens instead of 128 x 128): a first run that
# finishes in a minute or two on a 2-core CPU.
PRESETS = {"quick": {"batch_size": 16, "seq_len": 64}}

# Sizes above these are refused as typos rather than attempted.
_LIMITS = {"steps": 10_000_000, "batch_size": 1_000_000, "seq_len": 1_000_000, "vocab_size": 10_000_000,
           "hidden_dim": 65_536, "num_layers": 1_000, "num_heads": 65_536}

# The notebook's metadata.json key of each RunConfig constant, in the file's order (import, export).
NOTEBOOK_KEYS = {"total_steps": "steps", "batch_size": "batch_size", "seq_len": "seq_len", "learning_rate": "lr",
                 "weight_decay": "weight_decay", "beta1": "beta1", "beta2": "beta2", "epsilon": "eps",
                 "vocab_size": "vocab_size", "hidden_dim": "hidden_dim", "num_layers": "num_layers",
                 "num_heads": "num_heads", "random_seed": "seed"}


@dataclass(frozen=True)
class RunConfig:
    """The experiment's knobs; defaults are the notebook's values."""

    steps: int = 500
    batch_size: int = 128
    seq_len: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    vocab_size: int = 10000
    hidden_dim: int = 64
    num_layers: int = 2
    num_heads: int = 2
    seed: int = 42
    corpus: str | None = None
    tokenizer: str | None = None
    dead_mask: str | None = None
    device: str = "auto"
    # Not the notebook's: extra fields (RECORDABLE) and their rows. Absent from to_dict() when off,
    # so a default run's config (and every run recorded before these existed) reads as before.
    record: tuple[str, ...] = ()
    record_rows: str = "all"

    def __post_init__(self) -> None:
        if isinstance(self.record, str):  # --record's or a config file's "grad,exp_avg"
            object.__setattr__(self, "record", tuple(part.strip() for part in self.record.split(",")))
        elif isinstance(self.record, list):  # JSON has no tuples
            object.__setattr__(self, "record", tuple(self.record))
        self.validate()

    @property
    def recorded_fields(self) -> tuple[str, ...]:
        """Field names of the extra data recorded (--record), in the order given; () by default."""
        return tuple(RECORDABLE[name] for name in self.record)

    def validate(self) -> None:
        for f in fields(self):  # (record and record_rows: checked below)
            value = getattr(self, f.name)
            if f.name in ("corpus", "tokenizer", "dead_mask"):
                if value is not None and not isinstance(value, str):
                    raise CrucibleError(f"{f.name} must be a path, got {value!r}")
            elif f.type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise CrucibleError(f"{f.name} must be an integer, got {value!r}")
            elif f.type == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise CrucibleError(f"{f.name} must be a number, got {value!r}")
        for name, limit in _LIMITS.items():
            value = getattr(self, name)
            if value <= 0:
                raise CrucibleError(f"--{name.replace('_', '-')} must be positive, got {value}")
            if value > limit:
                raise CrucibleError(f"--{name.replace('_', '-')} {value} is larger than the limit {limit}")
        if self.hidden_dim % self.num_heads:
            raise CrucibleError(f"--num-heads {self.num_heads} does not divide --hidden-dim {self.hidden_dim}")
        for name in ("lr", "eps"):
            if not 0 < getattr(self, name) < float("inf"):
                raise CrucibleError(f"--{name} must be a positive finite number, got {getattr(self, name)}")
        if not (0 <= self.weight_decay < float("inf")):
            raise CrucibleError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise CrucibleError(f"--{name} must be in [0, 1), got {value}")
        if not 0 <= self.seed < 2**63:
            raise CrucibleError(f"--seed must be in [0, 2**63), got {self.seed}")
        if self.device not in DEVICES:
            raise CrucibleError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if not isinstance(self.record, tuple) or not all(isinstance(name, str) for name in self.record):
            raise CrucibleError(f"record must be a list of names ({', '.join(RECORDABLE)}), got {self.record!r}")
        for i, name in enumerate(self.record):
            if name not in RECORDABLE:
                what = "an empty name" if not name else f"unknown name {name!r}"
                raise CrucibleError(f"--record: {what}; choose from {', '.join(RECORDABLE)} (comma-separated)")
            if name in self.record[:i]:
                raise CrucibleError(f"--record: {name!r} is given twice")
        if self.record_rows not in RECORD_ROWS:
            raise CrucibleError(f"--record-rows must be one of {', '.join(RECORD_ROWS)}, got {self.record_rows!r}")
        if self.record_rows != "all" and not self.record:
            raise CrucibleError("--record-rows needs --record (it selects the rows of the recorded fields)")

    def to_dict(self) -> dict[str, Any]:
        """The config as stored in a run; without record/record_rows when nothing extra is recorded."""
        values = dataclasses.asdict(self)
        if self.record:
            values["record"] = list(self.record)
        else:
            del values["record"], values["record_rows"]
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RunConfig":
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise CrucibleError(f"unknown config key(s): {', '.join(unknown)}")
        floats = {f.name for f in fields(cls) if f.type == "float"}  # JSON has no int/float distinction: 1 is 1.0
        return cls(**{k: float(v) if k in floats and isinstance(v, int) and not isinstance(v, bool) else v
                      for k, v in values.items()})

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """The config in one line: its size, then whatever differs from the notebook's values."""
        changed = [f"{k}={v}" for k, v in self.to_dict().items()
                   if k not in ("steps", "batch_size", "seq_len", "device") and v != getattr(RunConfig(), k, None)]
        return (f"{self.steps} steps of {self.batch_size} x {self.seq_len} tokens, "
                + (", ".join(changed) if changed else "the notebook's other values"))


def training_line(run_dir, device: str, config: RunConfig) -> str:
    """`train`'s first line: the run, the device, the config."""
    return f"training {run_dir} on {device}: {config.describe()}"


def device_without_torch(name: str) -> str | None:
    """The device `name` stands for, when that is known without importing torch (1-2 s), else None.

    'cpu' is itself; 'auto' is 'cpu' when the installed torch was built with neither CUDA nor ROCm (its
    torch/version.py, read as text, says so) off macOS; 'cuda' and 'mps' wait for torch to check them.
    """
    if name != "auto":  # cuda, mps: said once torch has checked that it is there
        return name if name == "cpu" else None
    spec = importlib.util.find_spec("torch")  # finds the package without importing it
    if platform.system() == "Darwin" or spec is None or spec.origin is None:
        return None
    try:
        tree = ast.parse((Path(spec.origin).parent / "version.py").read_text())
    except (OSError, SyntaxError, ValueError):
        return None
    built_for = {}  # the module's constants: cuda, hip, rocm (None when torch was built without it)
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Constant):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name):
                    built_for[target.id] = node.value.value
    cpu_only = "cuda" in built_for and all(built_for.get(k) is None for k in ("cuda", "hip", "rocm"))
    return "cpu" if cpu_only else None


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or TOML file of RunConfig keys (dashes or underscores)."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as e:
        raise CrucibleError(f"cannot read config file {path}: {e.strerror or e}") from None
    try:
        values = (tomllib.loads if path.suffix.lower() == ".toml" else json.loads)(text.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CrucibleError(f"config file {path} is not valid {path.suffix[1:] or 'JSON'}: {e}") from None
    if not isinstance(values, dict):
        raise CrucibleError(f"config file {path} must hold a table of keys, not {type(values).__name__}")
    return {key.replace("-", "_"): value for key, value in values.items()}
