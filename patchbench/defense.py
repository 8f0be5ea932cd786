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
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any, ClassVar

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


@dataclass(frozen=True)
class RegisteredDefense:
    """One entry point of the group, loaded or not."""

    name: str
    distribution: str
    entry_point: EntryPoint

    def load(self) -> type[Defense]:
        cls = self.entry_point.load()
        if not (isinstance(cls, type) and issubclass(cls, Defense)):
            raise TypeError(f"{self.entry_point.value} is not a patchbench Defense subclass")
        return cls


def registered_defenses() -> dict[str, RegisteredDefense]:
    """Every entry point in the group, without importing any of them."""
    found = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else "?"
        found.setdefault(ep.name, RegisteredDefense(ep.name, dist, ep))
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
