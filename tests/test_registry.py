"""The reducer registry is the one place a method is declared: everything that lists, parses, dispatches or draws
methods reads it, and the torch-free contract's copy of the names stays equal to it."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

from prumerge.artifact import contract, node_stages
from prumerge.errors import ConfigError
from prumerge.reduce import registry
from prumerge.reduce.config import Method, ReducerConfig


def test_the_contract_names_the_registered_methods():
    assert contract.METHODS == registry.names()
    assert contract.ADAPTIVE_METHODS == tuple(n for n, s in registry.specs().items() if s.adaptive)
    assert tuple(m.value for m in Method) == registry.names()


def test_the_export_contract_enum_is_the_contracts_tuple():
    from prumerge.export.graph import Contract

    assert tuple(c.value for c in Contract) == contract.CONTRACTS


def test_the_encoder_calls_every_method_by_the_line_node_stages_attributes():
    """Reducer nodes are found by their stack trace: the encoder must call the registry's function on the line
    ``node_stages.REDUCER_CALL`` names (renaming it there alone would leave every reducer node unattributed)."""
    from prumerge.model.encoder import PruMergeEncoder

    assert inspect.getsource(PruMergeEncoder.forward).count(node_stages.REDUCER_CALL) == 2


def test_options_are_declared_once_and_checked_from_their_declaration():
    declared = registry.options()
    assert set(declared) == set(ReducerConfig().to_dict()) - {"method", "capacity"}
    assert declared["diverse_tokens"].owners == ("divprune",)
    assert set(declared["neighbors"].owners) == {"prumerge", "prumerge+"}
    with pytest.raises(ConfigError, match="neighbors must be an integer >= 0"):
        ReducerConfig(neighbors=-1)
    with pytest.raises(ConfigError, match="iqr_factor must be a finite number >= 0"):
        ReducerConfig(iqr_factor=float("nan"))
    with pytest.raises(ConfigError, match="unknown order 'sideways'; choose one of: official, spatial"):
        ReducerConfig(order="sideways")
    with pytest.raises(ConfigError, match="unknown reducer option"):
        ReducerConfig(bogus=1)
    with pytest.raises(ConfigError, match="unknown method 'zip'"):
        ReducerConfig(method="zip")
    config = ReducerConfig(method="visionzip", dominant_tokens=20)
    assert config.fixed_count == 30 and config.replace(contextual_tokens=4).fixed_count == 24
    assert ReducerConfig.from_dict(config.to_dict()) == config and hash(config) == hash(config.replace())
    with pytest.raises(AttributeError):
        config.neighbors = 3


def test_the_cli_offers_every_registered_method_and_option():
    from click.testing import CliRunner

    from prumerge.cli import main

    help_text = CliRunner().invoke(main, ["build", "--help"], terminal_width=400).output
    for name, spec in registry.options().items():
        assert spec.flag in help_text
    for name in registry.names():
        assert name in help_text


def test_the_registry_reads_without_torch():
    code = ("import sys; from prumerge.reduce import registry; from prumerge.reduce.config import ReducerConfig; "
            "registry.specs(); ReducerConfig(method='divprune', diverse_tokens=3); "
            "from prumerge.evaluate import budget; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
