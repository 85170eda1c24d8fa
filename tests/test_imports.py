"""The import contracts in pyproject.toml name every part of vlkit, so none escapes them."""
import pkgutil
from pathlib import Path

import vlkit
from vlkit.train.recipe import tomllib

ROOT = Path(__file__).resolve().parent.parent
DATA_ONLY = {"recipes"}  # packages that hold files, not code other modules import
NOT_LAYERS = {"__main__", "_version"}  # the entry point (cli's), the version string


def test_every_part_of_vlkit_is_in_the_layers_contract():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["type"] == "layers"]
    named = {m.strip() for layer in contract["layers"] for m in layer.split("|")}
    parts = {f"vlkit.{m.name}" for m in pkgutil.iter_modules(vlkit.__path__)}
    parts -= {f"vlkit.{n}" for n in DATA_ONLY | NOT_LAYERS}
    assert parts - named == set(), "add these to [tool.importlinter] layers in pyproject.toml"
    assert named - parts == set(), "the contract names modules that do not exist"
