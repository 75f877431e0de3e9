"""The reference pages in docs/reference/ against what the code does, so a page fails a test when it drifts.

- configuration.md: every field of the settings models (walked recursively), with its default and its
  choices, and nothing the models no longer have; the environment override rule as documented; the
  example as a configuration the gateway accepts.
- Every link between the pages, and every anchor, resolves.
"""

from __future__ import annotations

import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from gateway import config as config_module
from gateway.config import Settings, load_settings
from gateway.tenancy import model as tenancy_model

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "reference"
CONFIGURATION = REFERENCE / "configuration.md"


# --- reading Markdown ------------------------------------------------------------------------------------


@dataclass
class Section:
    heading: str
    level: int
    rows: list[list[str]]  # the table rows under the heading (header and rule lines left out)
    text: str


def sections(path: Path) -> list[Section]:
    found: list[Section] = []
    current = Section("", 1, [], "")
    in_code = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        heading = None if in_code else re.match(r"^(#+) (.+)$", line)
        if heading:
            found.append(current)
            current = Section(heading.group(2).strip(), len(heading.group(1)), [], "")
            continue
        current.text += line + "\n"
        if not in_code and line.startswith("|") and not re.match(r"^\|[-| ]+\|$", line):
            current.rows.append(split_row(line))
    found.append(current)
    for section in found:
        section.rows = section.rows[1:]  # the header row
    return found


def split_row(line: str) -> list[str]:
    # `\|` inside a cell is an escaped bar (`local` \| `open`), not a column.
    cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return [cell.strip().replace("\\|", "|") for cell in cells]


def ticked(text: str) -> list[str]:
    return re.findall(r"`([^`]+)`", text)


def anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation but `-` and `_` dropped, spaces as `-`."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


# --- walking the settings models -------------------------------------------------------------------------


def nested_model(annotation: Any) -> tuple[type[BaseModel], bool] | None:
    """The settings model inside a field's type, and whether the field holds a list of them."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = nested_model(arg)
            if found is not None:
                return found
        return None
    if origin is tuple:
        inner = nested_model(typing.get_args(annotation)[0])
        return None if inner is None else (inner[0], True)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    return None


def model_paths(model: type[BaseModel] = Settings, path: str = "") -> dict[str, type[BaseModel]]:
    """Every section of the configuration, by its path as the page writes it (`tenants[].keys[].limits`)."""
    found = {path: model}
    for name, info in model.model_fields.items():
        nested = nested_model(info.annotation)
        if nested is not None:
            child, is_list = nested
            child_path = (f"{path}.{name}" if path else name) + ("[]" if is_list else "")
            found.update(model_paths(child, child_path))
    return found


def literal_choices(annotation: Any) -> list[str]:
    if typing.get_origin(annotation) is typing.Literal:
        return [str(choice) for choice in typing.get_args(annotation)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [choice for arg in typing.get_args(annotation) for choice in literal_choices(arg)]
    return []


def plain(value: Any) -> Any:
    """A default as YAML would read it back: tuples as lists."""
    if isinstance(value, tuple | list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def documented_default(cell: str) -> Any:
    values = ticked(cell)
    assert len(values) == 1, f"a default is one `value`: {cell!r}"
    return yaml.safe_load(values[0])


# --- configuration.md ------------------------------------------------------------------------------------

PATHS = model_paths()


def config_sections() -> dict[str, Section]:
    """The page's field tables by the paths their headings name (`Top level` is the root)."""
    found: dict[str, Section] = {}
    for section in sections(CONFIGURATION):
        names = [""] if section.heading == "Top level" else ticked(section.heading)
        for name in names:
            assert name not in found, f"two sections for `{name}`"
            found[name] = section
    return found


SECTIONS = config_sections()


def test_every_settings_section_has_its_table() -> None:
    undocumented = sorted(set(PATHS) - set(SECTIONS))
    assert not undocumented, f"configuration.md has no section for {undocumented}"
    # A section heading that names no part of the settings any more (on_limit's keys have their own table).
    stale = sorted(set(SECTIONS) - set(PATHS) - {"on_limit"})
    assert not stale, f"configuration.md documents sections that no longer exist: {stale}"


@pytest.mark.parametrize("path", sorted(PATHS), ids=lambda p: p or "top-level")
def test_every_field_is_documented_with_its_default_and_choices(path: str) -> None:
    model = PATHS[path]
    rows = {ticked(row[0])[0]: row for row in SECTIONS[path].rows if ticked(row[0])}
    fields: dict[str, FieldInfo] = model.model_fields
    where = f"configuration.md, section `{path or 'Top level'}`"
    missing, stale = sorted(set(fields) - set(rows)), sorted(set(rows) - set(fields))
    assert not missing, f"{where}: fields not documented: {missing}"
    assert not stale, f"{where}: documented fields that no longer exist: {stale}"
    for name, field in fields.items():
        row = rows[name]
        assert len(row) == 4 and all(row), f"{where}, `{name}`: a row is | field | type | default | meaning |"
        _, kind, default, _ = row
        for choice in literal_choices(field.annotation):
            assert f"`{choice}`" in kind, f"{where}, `{name}`: the choice `{choice}` is not in its type"
        if field.is_required():
            assert default == "required", f"{where}, `{name}`: it is required"
            continue
        value = field.get_default(call_default_factory=True)
        if isinstance(value, BaseModel):
            assert default.startswith("see "), f"{where}, `{name}`: a section's default is its own table"
            continue
        assert documented_default(default) == plain(value), f"{where}, `{name}`: the default is {value!r}"


def test_on_limit_lists_every_limit() -> None:
    section = SECTIONS["on_limit"]
    documented = {ticked(row[0])[0] for row in section.rows}
    assert documented == tenancy_model._LIMITS


def test_environment_variables_that_are_not_overrides_are_listed() -> None:
    section = next(s for s in sections(CONFIGURATION) if s.heading == "Environment overrides")
    documented = {ticked(row[0])[0] for row in section.rows}
    assert documented == config_module._NOT_OVERRIDES


def test_override_examples_do_what_the_page_says(tmp_path: Path) -> None:
    """Each `GATEWAY_...=value  # path` line of the page, applied alone, sets the field it names."""
    section = next(s for s in sections(CONFIGURATION) if s.heading == "Environment overrides")
    examples = re.findall(r"^(GATEWAY_\w+)=(\S+)\s+# (\S+)$", section.text, re.MULTILINE)
    assert len(examples) >= 3
    for name, value, path in examples:
        settings: Any = load_settings(None, env={name: value})
        for part in path.split("."):
            settings = getattr(settings, part)
        assert settings == yaml.safe_load(value), f"{name}={value} should set {path}"


def test_the_example_is_a_configuration_the_gateway_accepts(tmp_path: Path) -> None:
    text = (CONFIGURATION).read_text()
    heading = text.index("## A complete example")
    block = re.search(r"```yaml\n(.*?)```", text[heading:], re.DOTALL)
    assert block is not None
    path = tmp_path / "gateway.yaml"
    path.write_text(block.group(1))
    env = {"ACME_CI_KEY": "sk-gw-example", "ANTHROPIC_API_KEY": "sk-ant-example"}
    settings = load_settings(path, env=env)
    assert settings.tenants[0].on_limit == {"budget": "downgrade:haiku", "queue": "fallback"}


def test_secret_fields_are_refused_in_the_file(tmp_path: Path) -> None:
    """The page says which fields only come from the environment; the file may not hold them."""
    section = SECTIONS[""]
    secrets = {ticked(row[0])[0] for row in section.rows if row[3].startswith(("secret", "not settable"))}
    assert secrets == config_module._SECRET_FIELDS & set(Settings.model_fields)
    for name in secrets:
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"{name}: x\n")
        with pytest.raises(config_module.ConfigError, match=name):
            load_settings(path, env={})


# --- links -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("page", sorted(REFERENCE.glob("*.md")), ids=lambda p: p.name)
def test_links_resolve(page: Path) -> None:
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        file, _, fragment = target.partition("#")
        linked = (page.parent / file).resolve() if file else page
        assert linked.exists(), f"{page.name}: broken link {target}"
        if fragment:
            anchors = {anchor(s.heading) for s in sections(linked) if s.heading}
            assert fragment in anchors, f"{page.name}: no heading for #{fragment} in {linked.name}"
