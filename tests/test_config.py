"""Config dataclasses <-> command-line flags and JSON."""

import dataclasses

import pytest

from jaxnets.runs.config import config_diff, config_to_dict, parse_config


@dataclasses.dataclass(frozen=True)
class _Config:
    learning_rate: float = 0.05
    epochs: int = 10
    nesterov: bool = True
    dataset: str = "auto"
    seed_list: tuple[int, ...] = (1, 2)
    limit: int | None = None


def test_every_field_is_a_flag():
    cfg = parse_config(
        _Config(),
        [
            "--learning-rate",
            "0.1",
            "--epochs",
            "3",
            "--no-nesterov",
            "--dataset",
            "idx:/d",
            "--seed-list",
            "4,5,6",
            "--limit",
            "7",
        ],
    )
    assert cfg == _Config(0.1, 3, False, "idx:/d", (4, 5, 6), 7)
    assert parse_config(_Config(), []) == _Config()
    assert parse_config(_Config(limit=3), ["--limit", "none"]).limit is None


def test_bad_flag_value_is_an_error(capsys):
    with pytest.raises(SystemExit):
        parse_config(_Config(), ["--epochs", "three"])
    assert "--epochs" in capsys.readouterr().err


def test_diff_names_fields():
    a = config_to_dict(_Config())
    b = config_to_dict(_Config(epochs=3, seed_list=(9,)))
    assert config_diff(a, b) == [("epochs", 10, 3), ("seed_list", [1, 2], [9])]
    assert config_diff(a, b, keys=["learning_rate"]) == []
