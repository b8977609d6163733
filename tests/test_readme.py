"""The README stays true: every configuration example loads as written, and every test the verified /
not-verified table names exists."""

from __future__ import annotations

import dataclasses
import re

import pytest
import yaml
from conftest import REPO

from edge_llama.config import Config, loads

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
YAML_BLOCK = re.compile(r"```yaml\n(.*?)```", re.S)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_documented_config_example_loads_as_written(doc) -> None:  # type: ignore[no-untyped-def]
    for block in YAML_BLOCK.findall(doc.read_text()):
        loads(block, source=doc.name)  # as the daemon reads a config file; raises ConfigError naming the key


def test_the_readme_configuration_block_is_the_defaults() -> None:
    """It says "The defaults": every key it shows has the default value, and every setting of the sections it
    shows is there (a new setting must be documented)."""
    readme = (REPO / "README.md").read_text()
    block = YAML_BLOCK.findall(readme[readme.index("## Configuration"):])[0]
    shown = yaml.safe_load(block)
    defaults = dataclasses.asdict(Config())
    for section, keys in shown.items():
        if not isinstance(keys, dict):  # a top-level setting (log_level): compared below
            continue
        missing = sorted(set(defaults[section]) - set(keys) - UNDOCUMENTED_HERE.get(section, set()))
        assert not missing, f"README's configuration block lacks {section}.{missing[0]}"
    config = loads(block)
    for section in shown:
        assert getattr(config, section) == getattr(Config(), section), f"README's {section} is not the default"
    assert loads("safety: {rules: [{category: offensive, block: 0.9, on: [output]}]}").safety.rules[0].on == [
        "output"]  # YAML 1.1 would read `on` as the key True


# Settings documented in their own README sections rather than in the defaults block.
UNDOCUMENTED_HERE = {"engine": {"fake"}, "server": {"allow_users", "allow_groups"}}


def test_the_verified_table_names_tests_that_exist() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Verified here, and not verified on hardware"):]
    rows = [line for line in section.split("\n## ")[0].splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) > 10
    for row in rows[1:]:
        claim, status, evidence = (cell.strip() for cell in row.strip("|").split("|"))
        named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", evidence)
        if status.startswith("verified"):
            assert named, f"'{claim}' says {status} but names no test"
        else:
            assert status == "not verified" and evidence, claim
        for path, name in named:
            assert re.search(rf"^def {name}\(", (REPO / path).read_text(), re.M), f"{path}::{name} does not exist"
