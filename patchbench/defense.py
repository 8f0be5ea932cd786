"""The Defense interface and the entry-point registry.

Every certified defense says which certification conditions it has and certifies a batch into
a ``Certificate`` (DESIGN.md §7). The vote-map family (``VoteMapDefense``) does that through
the shared core from a vote map and footprints; the masking family on its own. Built-ins and
third-party defenses register the same way, under the entry-point group
``patchbench.defenses``.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import math
import re
import typing
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any, ClassVar, NoReturn

import torch
from torch import Tensor, nn

from patchbench.certify import CONDITIONS, Certificate, certify_votes
from patchbench.footprints import Footprints
from patchbench.patches import PatchShape, check_fits

ENTRY_POINT_GROUP = "patchbench.defenses"
SCHEDULES = ("cosine", "constant")


@dataclass
class DefenseConfig:
    """Base of every defense's parameters: a flat dataclass of numbers, strings and bools."""


class ParameterError(ValueError):
    """A defense parameter value that cannot work (on the images at hand). ``param`` names
    the parameter, so that the command line can name its option (``--ablation-size``)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class TrainStep:
    """Where training stands when ``Defense.loss`` is called, so that a recipe can ramp."""

    epoch: int  # 0-based
    step: int  # 0-based, counted over all epochs
    epochs: int
    total_steps: int


# Features of the harness beyond run/report, and the hooks each needs (``Defense.missing``).
FEATURES: dict[str, tuple[str, ...]] = {
    "attack": ("attack_surrogate", "defended_prediction"),
    "bench": ("forward_passes", "reference_certify"),
    "gallery": ("explain",),
}


class Defense(abc.ABC):
    """A certified patch defense, of any certificate family. Subclasses set ``name``,
    ``description``, ``Config`` and ``conditions``.

    What the harness asks of every defense:

    * ``build_model(in_shape, num_classes)``: a fresh ``nn.Module``;
    * ``loss(model, images, labels, step)``: the training loss of one batch and the
      predictions the training-time forward pass makes (for the running accuracy);
    * ``optimizer(model)`` and ``schedule(optimizer, total_steps, kind)``: its recipe;
    * ``conditions``: the names of its certification conditions;
    * ``certify(model, images, patches, conditions)``: a ``Certificate``: per image and patch
      shape the defended prediction and a certified flag per condition (margins if it has);
    * ``num_parameters(model)``: what its size is reported as;
    * ``check(in_shape)`` (optional): refuse parameters that cannot work on images of that
      shape (an ablation wider than the image), before any work starts.

    Optional features each need their own hooks (``FEATURES``); ``missing(feature)`` names the
    ones a defense lacks, and the harness reports "not supported by <defense>: <missing>":

    * attack: ``attack_surrogate(model, patched, prediction, boxes, patch)``, a differentiable
      objective (N,) that is positive only where the prediction may change, and
      ``defended_prediction(model, patched, patch)``, the real prediction that judges it;
    * bench: ``forward_passes(model, images, patches)``, the bare forward passes that
      certification needs, and ``reference_certify(model, images, patches)``, an independent
      straightforward implementation (``bench.ReferenceResult``);
    * gallery: ``explain(model, image, patch)``, one ``gallery.Explanation`` of why the image is
      (not) certified.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Config: ClassVar[type[DefenseConfig]] = DefenseConfig
    conditions: ClassVar[tuple[str, ...]] = ()
    # TrainConfig fields of the defense's own recipe (epochs, batch_size, crop_padding, ...)
    train_defaults: ClassVar[dict[str, Any]] = {}
    # Parameters that only change how a trained model is read at certification (e.g. a vote
    # threshold): checkpoints are shared across them and they may differ at certification.
    certify_params: ClassVar[frozenset[str]] = frozenset()
    # Parameters a reader names a configuration by (e.g. a receptive field): a report's label
    # always shows them, and any other parameter only where it differs from its default.
    label_params: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: DefenseConfig | None = None, **params: Any) -> None:
        self.config = config if config is not None else self.Config(**params)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Defense:
        """Build from loosely typed params (CLI strings or JSON), checked against Config."""
        fields = {f.name: f for f in dataclasses.fields(cls.Config)}
        unknown = set(params) - set(fields)
        if unknown:
            raise ValueError(f"defense {cls.name!r} has no parameter(s) {sorted(unknown)}; "
                             f"it takes {sorted(fields)}")
        typed = {key: _coerce(value, type(getattr(cls.Config(), key)), key)
                 for key, value in params.items()}
        return cls(cls.Config(**typed))

    def params(self) -> dict[str, Any]:
        """The full configuration as plain data (stored in checkpoints and results)."""
        return dataclasses.asdict(self.config)

    @abc.abstractmethod
    def build_model(self, in_shape: tuple[int, int, int], num_classes: int) -> nn.Module: ...

    @abc.abstractmethod
    def loss(self, model: nn.Module, images: Tensor, labels: Tensor, step: TrainStep
             ) -> tuple[Tensor, Tensor]: ...

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(model.parameters(), lr=1e-3)

    def schedule(self, optimizer: torch.optim.Optimizer, total_steps: int, kind: str
                 ) -> torch.optim.lr_scheduler.LRScheduler:
        """The learning-rate schedule of the recipe: ``kind`` is TrainConfig.schedule."""
        if kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
        if kind == "constant":
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / max(1, total_steps))))

    def num_parameters(self, model: nn.Module) -> int:
        return sum(p.numel() for p in model.parameters())

    def check(self, in_shape: tuple[int, int, int]) -> None:
        """Refuse a configuration that cannot work on images of ``in_shape`` (C, H, W): raise
        a ValueError (``ParameterError`` naming the parameter) with a one-line message.

        Called by the harness for every configuration before any model is trained, loaded or
        certified; cheap (no model is built). Checks that need no image size belong in
        ``__init__``. The default accepts everything.
        """
        return None

    @abc.abstractmethod
    def certify(self, model: nn.Module, images: Tensor, patches: Sequence[PatchShape],
                conditions: Sequence[str]) -> Certificate:
        """Certify ``images`` (B, C, H, W) for every shape of ``patches`` under ``conditions``
        (a subset of ``self.conditions``); called without gradients."""

    def missing(self, feature: str) -> list[str]:
        """The hooks ``feature`` needs that this defense does not offer."""
        return [hook for hook in FEATURES[feature] if not callable(getattr(self, hook, None))]

    def unsupported(self, feature: str) -> str | None:
        """"not supported by <defense>: <what is missing>", or None where it is supported."""
        missing = self.missing(feature)
        if not missing:
            return None
        return f"{feature} not supported by {self.name}: it lacks {', '.join(missing)}"


class VoteMapDefense(Defense):
    """The vote-map family (DESIGN.md §1): a vote map (B, C, h, w) and the footprints of each
    patch shape go through the shared certification core, so a subclass only adds

    * ``votes(model, images)``: the vote map, bool (B, C, h, w);
    * ``footprints(patch, image_hw)``: the cells one patch shape can touch;

    and, for the attack, ``touched_cells(image_hw, boxes)`` (the cells each patch box can
    change, from the defense's own geometry) and ``soft_votes(model, images, cells)`` (the votes
    of those cells relaxed to [0, 1]); the gallery and bench need nothing more.
    """

    conditions = CONDITIONS

    @abc.abstractmethod
    def votes(self, model: nn.Module, images: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def footprints(self, patch: PatchShape, image_hw: tuple[int, int]) -> Footprints: ...

    def certify(self, model: nn.Module, images: Tensor, patches: Sequence[PatchShape],
                conditions: Sequence[str] = CONDITIONS) -> Certificate:
        image_hw = (images.shape[-2], images.shape[-1])
        check_fits(list(patches), image_hw)
        with torch.no_grad():
            votes = self.votes(model, images)
        return certify_votes(votes, [self.footprints(p, image_hw) for p in patches], conditions)

    def missing(self, feature: str) -> list[str]:
        hooks = {"attack": ("touched_cells", "soft_votes")}.get(feature, ())
        return [hook for hook in hooks if not callable(getattr(self, hook, None))]


def _coerce(value: Any, kind: type, key: str) -> Any:
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    text = str(value).strip()
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        return kind(text)
    except ValueError:
        raise ValueError(f"parameter {key!r} expects {kind.__name__}, got {value!r}") from None


class PluginError(TypeError):
    """A defense class that breaks the contract: found when it is registered or loaded, before
    any training, with a message that names the plugin."""


PARAMETER_TYPES = (int, float, str, bool)  # what a Config field (a --name value option) may be
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_defense_class(cls: object, origin: str) -> type[Defense]:
    """``cls`` if it keeps the contract the harness relies on before any work (README,
    "Writing a defense"); else PluginError("defense plugin <origin>: <what is wrong>")."""
    def fail(why: str) -> NoReturn:
        raise PluginError(f"defense plugin {origin}: {why}")

    if not (isinstance(cls, type) and issubclass(cls, Defense)):
        fail("is not a patchbench Defense subclass")
    if not (isinstance(cls.name, str) and NAME.match(cls.name)):
        fail(f"name {cls.name!r} must be a non-empty word (letters, digits, '-', '_', '.')")
    if not isinstance(cls.description, str):
        fail("description must be a string")
    config = cls.Config
    if not (isinstance(config, type) and dataclasses.is_dataclass(config)
            and issubclass(config, DefenseConfig)):
        fail("Config must be a dataclass that subclasses DefenseConfig")
    try:
        hints = typing.get_type_hints(config)
    except Exception as err:  # an annotation naming something that does not exist
        fail(f"Config annotations do not resolve ({type(err).__name__}: {err})")
    for f in dataclasses.fields(config):
        kind = hints.get(f.name)
        if kind not in PARAMETER_TYPES:
            fail(f"Config field {f.name!r} is of type {getattr(kind, '__name__', kind)}; a "
                 "parameter is an int, float, str or bool")
        if f.default is dataclasses.MISSING:
            fail(f"Config field {f.name!r} has no default")
        if type(f.default) is not kind:
            fail(f"Config field {f.name!r} is annotated {kind.__name__} but its default "
                 f"{f.default!r} is a {type(f.default).__name__}")
    if not (isinstance(cls.conditions, tuple) and cls.conditions
            and all(isinstance(c, str) and NAME.match(c) for c in cls.conditions)):
        fail(f"conditions must be a non-empty tuple of names, not {cls.conditions!r}")
    fields = {f.name for f in dataclasses.fields(config)}
    for attribute in ("certify_params", "label_params"):
        unknown = sorted(set(getattr(cls, attribute)) - fields)
        if unknown:
            fail(f"{attribute} names {unknown}, which are not Config fields")
    if not isinstance(cls.train_defaults, dict):
        fail("train_defaults must be a dict of TrainConfig fields")
    return cls


@dataclass(frozen=True)
class RegisteredDefense:
    """One registered defense, loaded or not: an entry point of the group, or a class given
    to ``register_defense`` in this process."""

    name: str
    distribution: str  # the providing distribution; "<this process>" for register_defense
    entry_point: EntryPoint | None = None
    defense: type[Defense] | None = None

    def load(self) -> type[Defense]:
        if self.defense is not None:
            return self.defense
        origin = f"{self.name!r} ({self.entry_point.value} from {self.distribution})"
        return check_defense_class(self.entry_point.load(), origin)


IN_PROCESS = "<this process>"
_registered_here: dict[str, type[Defense]] = {}


def register_defense(cls: type[Defense]) -> type[Defense]:
    """Register a defense class in this process (a notebook, a test), beside the entry points;
    usable as a class decorator. Checked at once (``check_defense_class``); a name an entry
    point already provides is refused. Local runs see it; worker processes (``--n-jobs`` > 1,
    Ray) import defenses afresh and see only entry points."""
    check_defense_class(cls, repr(getattr(cls, "__qualname__", cls)))
    taken = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if cls.name in taken:
        dist = taken[cls.name].dist.name if taken[cls.name].dist is not None else "?"
        raise PluginError(f"defense plugin {cls.__qualname__!r}: the name {cls.name!r} is "
                          f"registered by {dist}")
    _registered_here[cls.name] = cls
    return cls


def registered_defenses() -> dict[str, RegisteredDefense]:
    """Every registered defense (entry points and ``register_defense``), none imported."""
    found = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else "?"
        found.setdefault(ep.name, RegisteredDefense(ep.name, dist, ep))
    for name, cls in _registered_here.items():
        found.setdefault(name, RegisteredDefense(name, IN_PROCESS, defense=cls))
    return dict(sorted(found.items()))


def available_defenses() -> dict[str, type[Defense]]:
    """Defenses that import; each one that fails is reported as a warning and skipped."""
    loaded = {}
    for name, reg in registered_defenses().items():
        try:
            loaded[name] = reg.load()
        except Exception as err:  # a broken plugin must not break the others
            warnings.warn(f"defense {name!r} from {reg.distribution} failed to load: "
                          f"{type(err).__name__}: {err}", stacklevel=2)
    return loaded


class UnknownDefenseError(LookupError):
    """Raised for a defense name nobody registered, or one that fails to load."""


class DefenseNotFoundError(UnknownDefenseError):
    """A defense name nobody registered (the user's typo: a usage error on the command line)."""


def get_defense(name: str) -> type[Defense]:
    """The Defense class registered under ``name``; a clear error otherwise."""
    registry = registered_defenses()
    if name not in registry:
        raise DefenseNotFoundError(f"unknown defense {name!r}; available: {', '.join(registry)}")
    try:
        return registry[name].load()
    except Exception as err:
        raise UnknownDefenseError(f"defense {name!r} from {registry[name].distribution} "
                                  f"failed to load: {type(err).__name__}: {err}") from err


@dataclass(frozen=True)
class Parameter:
    """One Config field as ``patchbench defenses NAME`` shows it."""

    name: str
    kind: str  # int, float, str or bool
    default: Any
    help: str  # the field's trailing comment in its source, if any
    certify_only: bool


def parameters(cls: type[Defense]) -> list[Parameter]:
    """The defense's parameters: Config fields with their type, default and the comment that
    follows each in the source (the nearest class of the Config's MRO that defines it)."""
    hints = typing.get_type_hints(cls.Config)
    comments: dict[str, str] = {}
    for klass in reversed(cls.Config.__mro__):
        comments.update(_field_comments(klass))
    return [Parameter(f.name, getattr(hints.get(f.name), "__name__", str(hints.get(f.name))),
                      f.default, comments.get(f.name, ""), f.name in cls.certify_params)
            for f in dataclasses.fields(cls.Config)]


_FIELD_LINE = re.compile(r"^\s+(\w+)\s*:\s*[^=#]+=[^#]*#\s*(.+?)\s*$")


def _field_comments(klass: type) -> dict[str, str]:
    """``name: type = default  # help`` lines of a class body -> {name: help}."""
    import inspect  # only when parameters are shown

    try:
        lines = inspect.getsourcelines(klass)[0]
    except (OSError, TypeError):  # built in C, or no source at hand
        return {}
    return {m[1]: m[2] for m in map(_FIELD_LINE.match, lines) if m}


def defense_code(cls: type[Defense]) -> dict[str, str]:
    """Which code a defense's results come from: the distribution that provides it, its
    version, and a SHA-256 over the source files of the classes it is built from (the
    harness's own base classes excepted), so that a report can tell cells of one
    configuration computed by different code apart."""
    import inspect  # only when results are written

    registration = registered_defenses().get(cls.name)
    entry = registration.entry_point if registration else None
    dist = entry.dist if entry is not None else None
    digest = hashlib.sha256()
    files = []
    for klass in cls.__mro__:
        if klass.__module__ in (__name__, "abc", "builtins"):
            continue
        try:
            path = inspect.getsourcefile(klass)
        except TypeError:  # built in C
            path = None
        if path and path not in files:
            files.append(path)
            with open(path, "rb") as fh:
                digest.update(fh.read())
    return {"defense_distribution": registration.distribution if registration else "?",
            "defense_version": dist.version if dist is not None else "",
            "defense_source_sha256": digest.hexdigest() if files else ""}
