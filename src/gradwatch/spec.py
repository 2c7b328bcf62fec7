"""The one place that names every experiment knob: ``Spec = DataSpec + ModelSpec + TrainSpec``.

Like nanoGPT's ``GPTConfig``, a Spec is the single source of truth for a run; unlike it, every field
is validated (pydantic, frozen, unknown fields refused) so that a typo fails at once with one line
naming the field and what is allowed, instead of training the wrong model.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

Activation = Literal["sigmoid", "tanh", "relu", "leaky_relu", "prelu", "elu", "selu", "gelu", "linear"]
OutputActivation = Literal["sigmoid", "softmax", "tanh", "linear"]
Init = Literal[
    "default", "glorot_uniform", "glorot_normal", "he_uniform", "he_normal", "lecun_normal", "orthogonal"
]
SEQUENCES = ("adding", "recall")  # the data sets whose samples are sequences: the only ones a recurrent net reads
# data set -> the most samples it can give (digits is scikit-learn's bundled 1,797 images; spirals two equal arms)
SIZE = {"digits": lambda n: min(n, 1797), "spirals": lambda n: 2 * (n // 2)}
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # safe as a file name on every system

UNIT_SCALE = ("lecun_normal", "orthogonal")  # inits with Var(w) x fan_in = 1, which ``sigma_w2`` rescales
ADDED = {"model": {"sigma_w2": None, "sigma_b2": 0.0}}  # section -> field -> the default left out of Spec.key()


class SpecError(ValueError):
    """A user mistake in a spec: one line, ``field: got X; allowed: ...``."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataSpec(_Frozen):
    """Which data set, how much of it, and how it is split (scikit-learn's bundled generators)."""

    name: Literal["moons", "circles", "spirals", "xor", "digits", "adding", "recall"] = "moons"
    n_samples: int = Field(250, ge=8, le=200_000)
    noise: float = Field(0.05, ge=0.0, le=10.0)
    seed: int = Field(42, ge=0)
    test_size: float = Field(0.2, gt=0.0, lt=1.0)
    seq_len: int = Field(50, ge=2, le=2000, description="time steps, for the sequence tasks only")


class ModelSpec(_Frozen):
    """The network: a Keras-like MLP of ``depth`` Dense layers of ``width`` units, or a recurrent net."""

    kind: Literal["mlp", "rnn", "lstm", "gru"] = "mlp"
    depth: int = Field(10, ge=0, le=256, description="hidden layers (recurrent: ignored)")
    width: int = Field(10, ge=1, le=4096)
    activation: Activation = "sigmoid"
    output_activation: OutputActivation = "sigmoid"
    init: Init = "glorot_uniform"
    init_gain: float = Field(1.0, gt=0.0, le=100.0, description="multiplies the init's scale")
    bias_init: float = Field(0.0, ge=-100.0, le=100.0)
    sigma_w2: float | None = Field(None, gt=0.0, le=100.0, description="Var(w) x fan_in, mean field's sigma_w^2")
    sigma_b2: float = Field(0.0, ge=0.0, le=100.0, description="variance of Gaussian biases around bias_init")
    norm: Literal["none", "batch", "layer"] = "none"
    residual: bool = False


    @field_validator("sigma_w2")
    @classmethod
    def _unit_scale_init(cls, value: float | None, info: ValidationInfo) -> float | None:
        """sigma_w2 sets the scale of inits whose Var(w) x fan_in is 1 (on square layers), in place of init_gain."""
        if value is not None and (info.data.get("init") not in UNIT_SCALE or info.data.get("init_gain") != 1.0):
            raise PydanticCustomError("init_scale", f"with model.init {' or '.join(UNIT_SCALE)} and model.init_gain 1")
        return value


class TrainSpec(_Frozen):
    """How it trains: the seed notebook's Keras defaults (Adam, lr 0.001, batch 32)."""

    optimizer: Literal["sgd", "adam"] = "adam"
    learning_rate: float = Field(0.001, gt=0.0, le=100.0)
    epochs: int = Field(100, ge=1, le=100_000)
    batch_size: int = Field(32, ge=1, le=100_000)
    clip_norm: float | None = Field(None, gt=0.0)
    clip_value: float | None = Field(None, gt=0.0)
    stop_loss: float | None = Field(None, gt=0.0, description="stop once an epoch's loss is at or below this")
    seed: int = Field(0, ge=0)


class Spec(_Frozen):
    """A whole experiment; ``key()`` identifies it in the store and lets sweeps resume."""

    data: DataSpec = DataSpec()
    model: ModelSpec = ModelSpec()
    train: TrainSpec = TrainSpec()

    @model_validator(mode="after")
    def _runnable(self) -> Spec:
        """Fields fine alone that cannot run together: refused here, not by sklearn or torch mid-run."""
        data, model, batch = self.data, self.model, self.train.batch_size
        n_train = train_size(data)
        if n_train < 1:
            n = SIZE.get(data.name, int)(data.n_samples)
            raise SpecError(f"data.test_size: got {data.test_size}; allowed: at most {n - 1}/{n} "
                            f"(a share of data.n_samples={n} that leaves a training sample)")
        recurrent = model.kind != "mlp"
        if recurrent != (data.name in SEQUENCES):
            allowed = ", ".join(SEQUENCES) if recurrent else "moons, circles, spirals, xor, digits"
            raise SpecError(f"data.name: got {data.name!r}; allowed: {allowed} (for model.kind={model.kind})")
        last = n_train % batch or batch
        if model.norm == "batch" and not recurrent and last < 2:
            raise SpecError(f"train.batch_size: got {batch}; allowed: a size leaving >= 2 samples in every batch, "
                            f"last included (batch norm; {n_train} training samples)")
        return self

    def key(self) -> str:
        """Stable 16-hex-digit hash of the canonical JSON of every field.

        Fields added after runs were stored (``ADDED``) count only away from their default, so a
        stored run keeps its key and a sweep still resumes over it.
        """
        dump = self.model_dump(mode="json")
        for section, fields in ADDED.items():
            for name, default in fields.items():
                if dump[section][name] == default:
                    del dump[section][name]
        text = json.dumps(dump, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def replace(self, **dotted: Any) -> Spec:
        """A copy with ``model.depth=3``-style overrides, validated like a fresh spec."""
        return parse(_merge(self.model_dump(mode="json"), dotted))

    @classmethod
    def from_file(cls, path: str | Path) -> Spec:
        """Load a spec from YAML or JSON (JSON is YAML)."""
        return parse(load_mapping(path))


def train_size(data: DataSpec) -> int:
    """Training samples after the split, as scikit-learn's ``train_test_split`` counts them."""
    n = SIZE.get(data.name, int)(data.n_samples)
    return n - math.ceil(data.test_size * n)


def check_name(name: str) -> str:
    """A run name (empty: none), refused unless it is safe in a file name: reports name PNGs after runs."""
    if name and not NAME.fullmatch(name):
        raise SpecError(f"name: got {name!r}; allowed: up to 100 letters, digits, '.', '_' or '-', "
                        "starting with a letter or digit")
    return name


def file_part(name: str) -> str:
    """``name`` as one safe path part: runs of other characters become ``_`` (a study's ``adding/rnn`` is
    written ``adding_rnn``); the stored name keeps its slash, only file names change."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:100] or "unnamed"


def load_mapping(path: str | Path) -> dict:
    """Read a YAML/JSON mapping, refusing unreadable files with a one-line SpecError."""
    try:
        value = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise SpecError(f"{path}: cannot read ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    if not isinstance(value, dict):
        raise SpecError(f"{path}: got {type(value).__name__}; allowed: a mapping with data/model/train")
    return value


def parse(mapping: dict, cls: type[BaseModel] = Spec) -> Any:
    """Validate a nested mapping into ``cls``; the first problem becomes a one-line SpecError."""
    try:
        return cls.model_validate(mapping)
    except ValidationError as exc:
        raise SpecError(explain(exc, cls)) from None


def value_at(spec: BaseModel | dict, field: str) -> Any:
    """The value of dotted ``field`` (``"model.depth"``) in a Spec or in its ``model_dump``."""
    node = spec
    for part in field.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def _merge(base: dict, dotted: dict[str, Any]) -> dict:
    out = json.loads(json.dumps(base))
    for name, value in dotted.items():
        *parents, leaf = name.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SpecError(f"{name}: got a path through a value; allowed: data.*, model.*, train.*")
        node[leaf] = value
    return out


def from_flags(flags: list[str], base: Spec | None = None) -> Spec:
    """Build a spec from ``model.depth=3 train.optimizer=sgd`` strings (values parsed as YAML)."""
    dotted = {}
    for flag in flags:
        name, sep, text = flag.partition("=")
        if not sep:
            raise SpecError(f"{flag}: got no '='; allowed: field=value, e.g. model.depth=3")
        dotted[name.strip()] = yaml.safe_load(text)
    return (base or Spec()).replace(**dotted)


def explain(exc: ValidationError, cls: type[BaseModel]) -> str:
    """Turn pydantic's first error into ``field: got X; allowed: ...``."""
    err = exc.errors()[0]
    if isinstance(err.get("ctx", {}).get("error"), SpecError):  # a cross-field check already wrote its line
        return str(err["ctx"]["error"])
    loc = [str(p) for p in err["loc"] if not str(p).startswith(("function-", "literal["))]
    field = ".".join(loc) or cls.__name__
    got = err.get("input")
    ctx = err.get("ctx", {})
    if err["type"] == "extra_forbidden":
        return f"{field}: unknown field; allowed: {', '.join(_fields_at(cls, loc[:-1]))}"
    if err["type"] == "literal_error":
        allowed = ctx.get("expected", "").replace("'", "").replace(" or ", ", ")
    elif any(k in ctx for k in ("ge", "gt", "le", "lt")):
        allowed = _bounds(cls, loc) or err["msg"].lower()
    else:
        allowed = err["msg"].lower()
    return f"{field}: got {got!r}; allowed: {allowed}"


def _bounds(cls: type[BaseModel], loc: list[str]) -> str:
    """The whole allowed range of a numeric field, e.g. ``> 0.0 and < 1.0``."""
    owner = _model_at(cls, loc[:-1])
    info = owner.model_fields.get(loc[-1]) if owner else None
    ops = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    parts = [f"{ops[k]} {getattr(m, k)}" for m in (info.metadata if info else []) for k in ops if hasattr(m, k)]
    return " and ".join(parts)


def _model_at(cls: type[BaseModel], path: list[str]) -> type[BaseModel] | None:
    for part in path:
        annotation = cls.model_fields[part].annotation if part in cls.model_fields else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        cls = annotation
    return cls


def _fields_at(cls: type[BaseModel], path: list[str]) -> list[str]:
    owner = _model_at(cls, path)
    return list(owner.model_fields) if owner else []
