"""The README's settings table is the `Settings` class: every field, its variable and default."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from config import Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
ROW = re.compile(r"^\| `(\w+)` \| `(\w+)` \| `([^`]*)` \| (.+) \|$", re.MULTILINE)


def shown(default: Any) -> str:
    """A default as the table writes it: JSON for dicts and lists, as an env var takes them."""
    if isinstance(default, SecretStr):
        default = default.get_secret_value()
    if default is None:
        return "none"
    if default == "":
        return "empty"
    if isinstance(default, dict | list):
        return json.dumps(default, default=str)
    return str(default)


def test_every_setting_is_in_the_readme_with_its_env_var_and_default() -> None:
    section = README[README.index("## Operations") :]
    rows = {name: (env, default) for name, env, default, _ in ROW.findall(section)}
    for name, field in Settings.model_fields.items():
        default = field.default_factory() if field.default_factory else field.default
        assert rows.get(name) == (name.upper(), shown(default)), name
    assert set(rows) <= set(Settings.model_fields), set(rows) - set(Settings.model_fields)
