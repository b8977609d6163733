"""The README stays true: every configuration example loads as written, and every test the verified /
not-verified table names exists."""

from __future__ import annotations

import re

import pytest
from conftest import REPO

from edge_llama.config import loads

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
YAML_BLOCK = re.compile(r"```yaml\n(.*?)```", re.S)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_documented_config_example_loads_as_written(doc) -> None:  # type: ignore[no-untyped-def]
    for block in YAML_BLOCK.findall(doc.read_text()):
        loads(block, source=doc.name)  # as the daemon reads a config file; raises ConfigError naming the key


def test_the_readme_configuration_block_is_the_defaults() -> None:
    readme = (REPO / "README.md").read_text()
    block = YAML_BLOCK.findall(readme[readme.index("## Configuration"):])[0]
    config = loads(block)
    assert config.server.socket_mode == 0o660 and config.engine.kv_tokens == 2048
    assert loads("safety: {rules: [{category: offensive, block: 0.9, on: [output]}]}").safety.rules[0].on == [
        "output"]  # YAML 1.1 would read `on` as the key True


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
