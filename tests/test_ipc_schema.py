"""The machine-readable description of the IPC protocol (docs/ipc.openrpc.json, made by
:mod:`modality_link.ipc_schema`) against the code: every method, parameter, event, event field,
enumeration value and error exists in both, and docs/ipc.md's generated tables are current."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from unittest import mock

from modality_link import burns, ipc, ipc_schema, mpps_outbox, retrieving, sending, storage_commitment
from modality_link.api import SCHEMAS, Api
from modality_link.db import FINAL_STATES
from modality_link.net import mpps
from tests.support import REPO
from tests.support.service import InProcessService

SOURCES = sorted((REPO / "modality_link").rglob("*.py"))


def _str_constants(tree: ast.Module) -> dict[str, str]:
    """The module's NAME = "text" assignments."""
    return {t.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
            for t in node.targets if isinstance(t, ast.Name)
            and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)}


def _first_text(call: ast.Call, constants: dict[str, str]) -> str | None:
    if not call.args:
        return None
    arg = call.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    return constants.get(arg.id) if isinstance(arg, ast.Name) else None


def _dict_keys(func: ast.AST, name: str | None) -> set[str]:
    """The keywords of the ``dict(...)`` a function assigns to `name` or returns."""
    for node in ast.walk(func):
        value = None
        if isinstance(node, ast.Assign) and name and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            value = node.value
        elif isinstance(node, ast.Return) and name is None:
            value = node.value
        if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "dict":
            return {k.arg for k in value.keywords if k.arg}
    raise AssertionError(f"no dict() for {name or 'return'}")


def published_events() -> dict[str, set[str]]:
    """Each event type the code publishes, with the fields it gives (read from the source)."""
    found: dict[str, set[str]] = {}
    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        constants = _str_constants(tree)
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for func in functions:
            for node in ast.walk(func):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                    continue
                kind = node.func.attr
                if kind not in ("publish", "_publish", "publish_later"):
                    continue
                event = _first_text(node, constants)
                if event is None:
                    continue
                fields = {k.arg for k in node.keywords if k.arg}
                for k in node.keywords:
                    if k.arg is None:  # **(fields | live): the dict() the function made
                        names = [n.id for n in ast.walk(k.value) if isinstance(n, ast.Name)]
                        fields |= _dict_keys(func, names[0])
                if kind == "publish_later":  # its make(): the nested function's return
                    maker = next(f for f in ast.walk(func) if isinstance(f, ast.FunctionDef) and f is not func)
                    fields |= _dict_keys(maker, None)
                found.setdefault(event, set()).update(fields)
    return found


def raised_alert_codes() -> set[str]:
    codes = set()
    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        constants = _str_constants(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr in ("alert", "_alert", "on_alert"):
                code = _first_text(node, constants)
                if code is not None:
                    codes.add(code)
    return codes


def test_every_method_and_parameter_is_in_the_schema() -> None:
    table = set(Api(mock.MagicMock()).methods()) | {"events.subscribe"}
    assert set(ipc_schema.METHODS) == table == set(SCHEMAS)
    doc = {m["name"]: m for m in ipc_schema.document()["methods"]}
    assert set(doc) == table
    for name, rules in SCHEMAS.items():
        params = {p["name"]: p for p in doc[name]["params"]}
        assert list(params) == list(rules), name
        for p, rule in rules.items():
            assert params[p]["required"] is rule.required
    assert doc["exam.start"]["params"][1]["schema"]["oneOf"][0]["type"] == "string"  # patient_id


def test_every_event_and_field_published_is_in_the_schema() -> None:
    published = published_events()
    described = {name: {f.name for f in fields} for name, (_, fields) in ipc_schema.EVENTS.items()}
    assert set(published) == set(described), "events published but not described, or the reverse"
    for name in published:
        assert published[name] == described[name], name
    assert set(ipc_schema.ENUMS["event_type"]) == set(published)


def test_every_enumeration_matches_the_code() -> None:
    enums = ipc_schema.ENUMS
    assert list(enums["job_state"]) == ["queued", "running", *FINAL_STATES]
    assert set(enums["job_kind"]) == {sending.KIND, sending.COMMIT_KIND, storage_commitment.KIND, retrieving.KIND,
                                      burns.KIND}
    assert list(enums["exam_state"]) == [mpps.IN_PROGRESS, mpps.COMPLETED, mpps.DISCONTINUED]
    assert set(enums["mpps_message"]) == {mpps_outbox.CREATE, mpps_outbox.SET}
    assert set(enums["alert_code"]) == raised_alert_codes()
    assert set(enums["burn_end"]) == set(FINAL_STATES)


def test_every_error_code_is_named_with_its_code() -> None:
    codes = {name: value for name, value in vars(ipc).items()
             if name.isupper() and isinstance(value, int) and -32768 <= value <= -32000}
    assert {name: code for name, code, _ in ipc_schema.ERRORS} == codes
    doc = (REPO / "docs" / "ipc.md").read_text(encoding="utf-8")
    for name, code, _ in ipc_schema.ERRORS:
        assert f"| `{name}` | {code} |" in doc


def test_the_documents_are_current(tmp_path: Path) -> None:
    """docs/ipc.openrpc.json and docs/ipc.md's tables are what ``python -m modality_link.ipc_schema``
    makes now (run it after a change)."""
    assert json.loads((REPO / "docs" / "ipc.openrpc.json").read_text(encoding="utf-8")) == ipc_schema.document()
    md = (REPO / "docs" / "ipc.md").read_text(encoding="utf-8")
    assert ipc_schema.fill(md) == md, "docs/ipc.md's generated tables are stale"


def test_results_have_the_fields_the_schema_gives(service_in_process: InProcessService, tmp_path: Path) -> None:
    from tests.support.instances import spool_images

    svc = service_in_process

    def holds(method: str, result: dict) -> None:
        fields = ipc_schema.METHODS[method][3]
        assert {f.name for f in fields} <= set(result), method
        for f in fields:
            if f.enum is not None and result[f.name] is not None:
                assert result[f.name] in ipc_schema.ENUMS[f.enum], (method, f.name)

    holds("hello", svc.call("hello", protocol=ipc.PROTOCOL_VERSION))
    holds("status", svc.call("status"))
    ex = svc.call("exam.start", patient_id="S1", patient_name="Schema^Sam")
    holds("exam.start", ex)
    paths = spool_images(tmp_path / "s", 1)
    holds("exam.add_image", svc.call("exam.add_image", exam_id=ex["exam_id"], paths=paths))
    holds("exam.show", svc.call("exam.show", exam_id=ex["exam_id"]))
    series = svc.call("exam.show", exam_id=ex["exam_id"])["series"][0]["series_uid"]
    holds("exam.series_complete", svc.call("exam.series_complete", exam_id=ex["exam_id"], series_uid=series))
    holds("exam.end", svc.call("exam.end", exam_id=ex["exam_id"]))
    holds("events.subscribe", svc.call("events.subscribe"))
