"""The README's "Use it in your FastAPI app" snippet, run as pasted against a real redis-server."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

from ratepilot.servers import RedisServer, free_port
from tests.limiter.support import ServedApp, write_config

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_snippet() -> str:
    """The first python block under the README heading "Use it in your FastAPI app"."""
    text = README.read_text()
    section = text[text.index("## Use it in your FastAPI app") :]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None, "the section has no python block"
    return match.group(1)


def test_readme_snippet_serves_limits_and_charges(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(tmp_path / "limiter.yaml", redis_server.url)  # the free tier's client bucket holds 5
    (tmp_path / "readme_app.py").write_text(readme_snippet())
    monkeypatch.chdir(tmp_path)  # the snippet opens "limiter.yaml" as a user's app would
    spec = importlib.util.spec_from_file_location("readme_app", tmp_path / "readme_app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "readme_app", module)
    spec.loader.exec_module(module)
    served = ServedApp(module.app, free_port())
    served.start()
    try:
        items = [served.client.get("/items", headers={"x-api-key": "free_a"}) for _ in range(6)]
        assert [r.status_code for r in items] == [200] * 5 + [429]
        assert items[0].json() == ["a", "b"] and "retry-after" in items[5].headers
        reports = [served.client.post("/reports", headers={"x-api-key": "free_b"}) for _ in range(2)]
        assert [r.status_code for r in reports] == [200, 429]  # 3 tokens each from a bucket of 5
        assert reports[0].json() == {"queued": True} and reports[1].json()["tokens_needed"] == 3
    finally:
        served.stop()
    assert served.leftover_tasks == []
