"""The plugin file's hard rules, and manifest.json kept in step with it."""

from __future__ import annotations

import ast
import sys
import types

from scripts.build_manifest import MANIFEST, PLUGIN, parse_frontmatter, render
from tests.factories import load_plugin_module

SOURCE = PLUGIN.read_text(encoding="utf-8")
ALLOWED_IMPORTS = {"pydantic", "httpx", "sqlalchemy"}


def test_manifest_json_carries_the_current_plugin_source() -> None:
    assert MANIFEST.read_text(encoding="utf-8") == render(SOURCE), "run `make manifest`"


def test_frontmatter_opens_on_line_one_with_the_required_keys() -> None:
    assert SOURCE.splitlines()[0] == '"""'
    frontmatter = parse_frontmatter(SOURCE)
    assert {"title", "author", "version", "license", "description", "required_open_webui_version"} <= set(
        frontmatter
    )
    assert frontmatter["required_open_webui_version"] == "0.10.0"
    assert "requirements" not in frontmatter  # installs offline: nothing to pip-install


def test_no_text_that_open_webui_rewrites_on_load() -> None:
    for needle in ("from utils", "from main", "from config", "from apps"):
        assert needle not in SOURCE


def test_imports_only_the_standard_library_and_what_open_webui_ships() -> None:
    roots = set()
    for node in ast.walk(ast.parse(SOURCE)):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    foreign = {root for root in roots if root not in sys.stdlib_module_names and root != "__future__"}
    assert foreign <= ALLOWED_IMPORTS


def test_never_prints_and_never_sets_toggle() -> None:
    tree = ast.parse(SOURCE)
    calls = {
        node.func.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }
    assert "print" not in calls
    module = load_plugin_module()
    assert not getattr(module.Filter(), "toggle", None)


def test_loads_from_text_without_a_file(data_dir: object) -> None:
    module = load_plugin_module()
    assert isinstance(module, types.ModuleType) and "__file__" not in module.__dict__
    instance = module.Filter()
    for hook in ("inlet", "stream", "outlet"):
        assert callable(getattr(instance, hook))
