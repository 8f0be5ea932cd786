"""A plugin that breaks the contract is refused when it is registered or loaded, naming the
plugin, never after training; ``register_defense`` adds a defense in-process (a notebook)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint
from pathlib import Path
from types import ModuleType

import pytest
import torch
from click.testing import CliRunner

from patchbench import defense as registry
from patchbench.cli import cli
from patchbench.defense import (
    ENTRY_POINT_GROUP,
    DefenseConfig,
    PluginError,
    RegisteredDefense,
    UnknownDefenseError,
    get_defense,
    register_defense,
)
from patchbench.footprints import Footprints
from patchbench.running.sweep import run_sweep


def example_plugin() -> ModuleType:
    """The example plugin's module (tests/plugins/example), imported from its source file."""
    path = Path(__file__).parent / "plugins" / "example" / "src" / "patchbench_example" / \
        "__init__.py"
    spec = importlib.util.spec_from_file_location("example_plugin_source", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class PixelVote(example_plugin().PixelVote):
    """The example plugin's defense under a name no entry point has."""

    name = "pixel-vote-here"


@pytest.fixture
def clean_registry():
    before = dict(registry._registered_here)
    yield
    registry._registered_here.clear()
    registry._registered_here.update(before)


def test_register_defense_makes_a_class_usable_in_process(clean_registry, tmp_path) -> None:
    assert register_defense(PixelVote) is PixelVote  # a class decorator, too
    assert get_defense("pixel-vote-here") is PixelVote
    listed = CliRunner().invoke(cli, ["defenses"])
    assert "pixel-vote-here" in listed.stdout and "<this process>" in listed.stdout
    rows = run_sweep("pixel-vote-here", "2x2", "synthetic", n_images=8, device="cpu",
                     train={"epochs": 1, "max_images": 64}, results_dir=tmp_path,
                     show_progress=False)
    assert set(rows["status"]) == {"computed"} and set(rows["defense"]) == {"pixel-vote-here"}


def test_a_name_an_entry_point_provides_is_not_taken(clean_registry) -> None:
    class Impostor(PixelVote):
        name = "bagcert"

    with pytest.raises(PluginError, match="'bagcert' is registered by patchbench"):
        register_defense(Impostor)
    assert get_defense("bagcert").__name__ == "BagCert"


def config_with(**fields) -> type:
    """A Config dataclass with the given (annotation, default) fields."""
    namespace = {"__annotations__": {k: t for k, (t, _) in fields.items()}}
    namespace.update({k: d for k, (_, d) in fields.items() if d is not ...})
    return dataclass(type("BadConfig", (DefenseConfig,), namespace))


BROKEN = {
    "a list parameter": ({"Config": config_with(sizes=(list, None))},
                         "Config field 'sizes' is of type list"),
    "a default of another type": ({"Config": config_with(lr=(float, 1))},
                                  "Config field 'lr' is annotated float but its default 1 is "
                                  "a int"),
    "no default": ({"Config": config_with(lr=(float, ...))}, "Config field 'lr' has no default"),
    "a Config that is no DefenseConfig": ({"Config": type("Plain", (), {})},
                                          "Config must be a dataclass that subclasses"),
    "a name with a space": ({"name": "pixel vote"}, "name 'pixel vote' must be a non-empty word"),
    "no conditions": ({"conditions": ()}, "conditions must be a non-empty tuple"),
    "a certify parameter that does not exist": ({"certify_params": frozenset({"theta"})},
                                                "certify_params names ['theta']"),
}


@pytest.mark.parametrize("case", BROKEN, ids=list(BROKEN))
def test_a_broken_class_is_refused_when_registered(case: str, clean_registry) -> None:
    overrides, message = BROKEN[case]
    broken = type("Broken", (PixelVote,), dict(overrides))
    with pytest.raises(PluginError, match=r"defense plugin 'Broken': ") as err:
        register_defense(broken)
    assert message in str(err.value)


def test_a_broken_entry_point_is_refused_when_loaded_naming_it() -> None:
    point = EntryPoint("broken-config", f"{__name__}:ListConfigDefense", ENTRY_POINT_GROUP)
    with pytest.raises(PluginError) as err:
        RegisteredDefense("broken-config", "some-dist", point).load()
    assert str(err.value).startswith(
        f"defense plugin 'broken-config' ({__name__}:ListConfigDefense from some-dist): "
        "Config field 'sizes' is of type list")


class ListConfigDefense(PixelVote):
    name = "broken-config"

    @dataclass
    class Config(DefenseConfig):
        sizes: list = field(default_factory=list)


def test_an_unloadable_plugin_is_one_line_for_get_defense(monkeypatch) -> None:
    point = EntryPoint("broken-config", f"{__name__}:ListConfigDefense", ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "registered_defenses", lambda: {
        "broken-config": RegisteredDefense("broken-config", "some-dist", point)})
    with pytest.raises(UnknownDefenseError, match="failed to load: PluginError: defense "
                                                  "plugin 'broken-config'"):
        get_defense("broken-config")


@pytest.mark.parametrize(("args", "message"), [
    (((28, 28), [(0, 1)], ((0, 1),), False), "Footprints rows must be a tuple"),
    (((28, 28), ((0, 1),), ((0, torch.tensor(1)),), False), "Footprints cols must be a tuple"),
    (([28, 28], ((0, 1),), ((0, 1),), False), "Footprints map_hw must be a tuple"),
    (((28, 28), ((0, 1),), ((0, 1),), 1), "Footprints cyclic must be a bool"),
])
def test_footprints_of_other_types_are_refused_when_built(args, message) -> None:
    with pytest.raises(TypeError, match=message):
        Footprints(*args)
