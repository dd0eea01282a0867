"""`make demo`'s set-up steps against the suite's real Open WebUI: the second user, the models
shared with every user, and the banner's logins, ledger and CLI command."""

from __future__ import annotations

import os
import shlex
import uuid
from pathlib import Path

import pytest

from scripts.demo import PUBLIC_READ, Account, Demo, banner, ensure_user, share_models
from tests.e2e.owui import OpenWebUIClient, OpenWebUIError, OpenWebUIServer

pytestmark = pytest.mark.e2e


def test_every_model_is_made_public_once(admin: OpenWebUIClient) -> None:
    first = share_models(admin)
    models = admin.get_models()
    assert models
    for model in models:
        grants = (model.get("info") or {}).get("access_grants") or []
        assert [{k: g[k] for k in PUBLIC_READ} for g in grants] == [PUBLIC_READ], model["id"]
    assert set(first) <= {m["id"] for m in models}
    assert share_models(admin) == []  # a second run changes nothing


def test_the_second_user_is_created_once_and_a_changed_password_is_named(
    admin: OpenWebUIClient, openwebui: OpenWebUIServer
) -> None:
    account = Account("Demo User", f"demo-{uuid.uuid4().hex[:6]}@example.com", "demo-user-password")
    ensure_user(admin, account)
    ensure_user(admin, account)  # the next run of the demo finds it
    with OpenWebUIClient.login(openwebui.url, account.email, account.password) as user:
        assert user.user["role"] == "user"
    with pytest.raises(OpenWebUIError, match=f"{account.email} exists but does not sign in"):
        ensure_user(admin, Account(account.name, account.email, "another-password"))


def test_the_banner_names_both_logins_the_ledger_and_the_command_that_reads_it(
    openwebui: OpenWebUIServer,
) -> None:
    demo = Demo(
        server=openwebui,
        admin=Account("Admin", openwebui.admin_email, openwebui.admin_password),
        user=Account("Demo User", "user@example.com", "user-password"),
        simulated=True,
    )
    text = banner(demo)
    for fact in (openwebui.url, openwebui.admin_email, openwebui.admin_password, "user@example.com"):
        assert fact in text
    assert "user-password" in text and f"{openwebui.data_dir / 'openrouter_usage.sqlite3'}" in text
    (command,) = [line.strip() for line in text.splitlines() if line.strip().endswith(" report")]
    assignment, script, verb = shlex.split(command)
    assert assignment == f"DATA_DIR={openwebui.data_dir}" and verb == "report"
    assert Path(script).name == "openrouter-usage" and os.access(script, os.X_OK)
