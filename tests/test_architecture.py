"""The module rules, kept by reading the source (ast, tokenize); nothing here imports the code.

- `hw/` and `sim/` use nothing private (a name starting with ``_``) of `modality_link`;
- only the database package (``modality_link/db.py``, or ``modality_link/db/``) imports sqlite3
  or calls ``execute``/``executemany``/``executescript``;
- only the IPC module (``modality_link/ipc.py``) frames JSON-RPC: the ``"jsonrpc"`` member, the
  JSON-RPC error codes, JSON over a socket (a Unix domain socket too, but in the modules listed
  below by name, which send no JSON);
- no module of `modality_link` imports the IPC module except the service wiring, the IPC API
  and the clients, listed below by name;
- comments and docstrings cite the DICOM standard or this repository's docs, and every section
  they cite as ``docs/design.md "..."`` exists.

Each checker takes source text, so that the ``test_checker_*`` tests show it on a small example
that breaks its rule.
"""

from __future__ import annotations

import ast
import functools
import io
import re
import tokenize
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent


def python_files(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py"))


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@functools.cache
def source(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def is_modality_link(module: str) -> bool:
    return module == "modality_link" or module.startswith("modality_link.")


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def docstrings(tree: ast.AST) -> list[ast.Constant]:
    """The docstring nodes of a module, its classes and its functions."""
    found: list[ast.Constant] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(
                first.value.value, str
            ):
                found.append(first.value)
    return found


# -- checkers -------------------------------------------------------------------------------------


def private_uses(text: str) -> list[str]:
    """Private names of `modality_link` that `text` imports or reaches through an imported name."""
    tree = ast.parse(text)
    found: list[str] = []
    bound: set[str] = set()  # local names that come from modality_link
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if is_modality_link(alias.name):
                    if any(is_private(part) for part in alias.name.split(".")):
                        found.append(alias.name)
                    bound.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and is_modality_link(node.module or ""):
            module = node.module or ""
            if any(is_private(part) for part in module.split(".")):
                found.append(module)
            for alias in node.names:
                if is_private(alias.name):
                    found.append(f"{module}.{alias.name}")
                bound.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_private(node.attr):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in bound:
                found.append(f"{ast.unparse(node.value)}.{node.attr}")
    return found


SQL_CALLS = {"execute", "executemany", "executescript"}


def sql_uses(text: str) -> list[str]:
    """Imports of sqlite3 and calls of execute/executemany/executescript in `text`."""
    found = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] == "sqlite3"]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "sqlite3":
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in SQL_CALLS:
            found.append(f"line {node.lineno}: .{node.func.attr}(")
    return found


def jsonrpc_framing(text: str) -> list[str]:
    """JSON-RPC framed outside the IPC module: the "jsonrpc" member, a reserved JSON-RPC error
    code (-32768 to -32000), a Unix domain socket, or JSON and a socket in one module."""
    tree = ast.parse(text)
    skip = {id(d) for d in docstrings(tree)}
    found = []
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            if "jsonrpc" in node.value:
                found.append(f"line {node.lineno}: the \"jsonrpc\" member")
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(
            node.operand, ast.Constant
        ) and isinstance(node.operand.value, int) and 32000 <= node.operand.value <= 32768:
            found.append(f"line {node.lineno}: JSON-RPC error code -{node.operand.value}")
        elif isinstance(node, ast.Attribute) and node.attr == "AF_UNIX":
            found.append(f"line {node.lineno}: a Unix domain socket")
        elif isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add((node.module or "").split(".")[0])
    if "json" in imported and imported & {"socket", "socketserver"}:
        found.append("JSON and a socket in one module")
    return found


def imports_module(text: str, path: str, target: str) -> bool:
    """Whether `text` (the file at `path`, relative to the repository) imports module `target`,
    absolutely or relatively, at the top or inside a function."""
    package = path.removesuffix(".py").split("/")[:-1]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            if any(a.name == target or a.name.startswith(target + ".") for a in node.names):
                return True
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            if module == target or module.startswith(target + "."):
                return True
            if any(f"{module}.{a.name}" == target for a in node.names):
                return True
    return False


#: What a comment or docstring must not cite: requirement IDs (a letter A-M and one or two
#: digits; not G0-G3, the code elements of ISO 2022, PS3.5 §6.1.2.5), the requirements and
#: design documents outside this repository, and the source products by number.
FORBIDDEN_CITATION = re.compile(
    r"\bREQUIREMENTS\b|\bDESIGN\.md\b|\bshared/|\bseeds?\s+\d{3}|\b00[0-4]\s+(?:T\d|§)"
    r"|\b(?!G[0-3]\b)[A-M]\d{1,2}\b"
)
#: A section sign is fine after the standard a text cites (PS3.x, IHE, an RFC, an ISO standard).
STANDARDS = ("PS3.", "IHE", "RFC", "ISO")


def comments_and_docstrings(text: str) -> list[tuple[int, str]]:
    found = [
        (tok.start[0], tok.string)
        for tok in tokenize.generate_tokens(io.StringIO(text).readline)
        if tok.type == tokenize.COMMENT
    ]
    return found + [(d.lineno, str(d.value)) for d in docstrings(ast.parse(text))]


def forbidden_citations(text: str) -> list[str]:
    found = []
    for line, comment in comments_and_docstrings(text):
        hits = [m.group() for m in FORBIDDEN_CITATION.finditer(comment)]
        if "§" in comment and not any(s in comment for s in STANDARDS):
            hits.append("§ without a standard")
        found += [f"line {line}: {h}" for h in hits]
    return found


CITED_SECTION = re.compile(r'docs/(design|ipc)\.md\)?,?\s*"([^"]+)"')


def cited_sections(text: str) -> list[tuple[str, str]]:
    """(document, section) for every `docs/design.md "Section"` in `text`, also when the
    citation is broken over comment lines."""
    flat = re.sub(r"\s*\n\s*(?:#:?)?\s*", " ", text)
    return [(f"docs/{m.group(1)}.md", m.group(2)) for m in CITED_SECTION.finditer(flat)]


def headings(markdown: str) -> set[str]:
    return {m.group(1).strip() for m in re.finditer(r"^#{1,6}\s+(.+)$", markdown, re.MULTILINE)}


# -- the rules ------------------------------------------------------------------------------------


def test_hw_and_sim_use_nothing_private_of_modality_link() -> None:
    found = {rel(p): private_uses(source(p)) for p in python_files("hw", "sim")}
    found = {k: v for k, v in found.items() if v}
    assert not found, f"private names of modality_link used: {found}"


def is_db_package(path: str) -> bool:
    return path == "modality_link/db.py" or path.startswith("modality_link/db/")


def test_only_the_db_package_runs_sql() -> None:
    found = {rel(p): sql_uses(source(p)) for p in python_files("modality_link", "hw", "sim")}
    outside = {k: v for k, v in found.items() if v and not is_db_package(k)}
    assert not outside, f"SQL outside the db package: {outside}"
    assert any(v for k, v in found.items() if is_db_package(k)), "the db package runs no SQL?"


IPC_MODULE = "modality_link/ipc.py"
#: Modules besides the IPC module that may open a Unix domain socket, and why: what they send is
#: not JSON-RPC (every other finding of the checker still counts for them).
UNIX_SOCKET_USERS = {
    "modality_link/systemd.py": "sd_notify(3): KEY=VALUE datagrams to the service manager's $NOTIFY_SOCKET",
}


def test_only_the_ipc_module_frames_json_rpc() -> None:
    found = {rel(p): jsonrpc_framing(source(p)) for p in python_files("modality_link", "hw", "sim")}
    found = {k: [f for f in v if not (k in UNIX_SOCKET_USERS and f.endswith(": a Unix domain socket"))]
             for k, v in found.items()}
    outside = {k: v for k, v in found.items() if v and k != IPC_MODULE}
    assert not outside, f"JSON-RPC framed outside {IPC_MODULE}: {outside}"
    assert found[IPC_MODULE], f"{IPC_MODULE} frames no JSON-RPC?"


#: The modules of modality_link that may import the IPC module, and why.
IPC_IMPORTERS = {
    "modality_link/service.py": "the wiring: serves the IPC methods on the socket",
    "modality_link/api.py": "the IPC methods: domain errors become IPC errors here",
    "modality_link/cli.py": "a client of the running service",
    "modality_link/demo.py": "a client: drives the service it started, as the acquisition software does",
    "modality_link/client.py": "the supported client library of the acquisition software (docs/client.md)",
    "modality_link/ipc_schema.py": "describes the protocol: its version, error codes and methods (docs/ipc.openrpc.json)",
}


def test_no_domain_module_imports_the_ipc_module() -> None:
    importers = {
        rel(p) for p in python_files("modality_link")
        if rel(p) != IPC_MODULE and imports_module(source(p), rel(p), "modality_link.ipc")
    }
    unexpected = importers - IPC_IMPORTERS.keys()
    assert not unexpected, f"domain modules import the IPC module: {sorted(unexpected)}"
    assert "modality_link/api.py" in importers, "the IPC API no longer imports the IPC module?"


def test_comments_cite_the_standard_or_this_repository() -> None:
    found = {rel(p): forbidden_citations(source(p)) for p in python_files("modality_link", "hw", "sim", "tests")}
    found = {k: v for k, v in found.items() if v}
    assert not found, f"comments cite documents that are not in this repository: {found}"


def documentation() -> list[Path]:
    return [ROOT / "README.md", ROOT / "setup.cfg", ROOT / "tox.ini", *sorted((ROOT / "docs").glob("*.md"))]


def test_docs_cite_only_this_repository() -> None:
    found = {}
    for path in [*documentation(), *python_files("bench")]:
        text = source(path)
        hits = [m.group() for m in FORBIDDEN_CITATION.finditer(text)]
        if hits:
            found[rel(path)] = hits
    assert not found, found


def test_cited_sections_exist() -> None:
    sections = {f"docs/{name}": headings(source(ROOT / "docs" / name)) for name in ("design.md", "ipc.md")}
    cited = [
        (rel(p), doc, section)
        for p in [*python_files("modality_link", "hw", "sim", "tests", "bench"), *documentation()]
        if p != Path(__file__).resolve()  # its examples cite made-up sections
        for doc, section in cited_sections(source(p))
    ]
    assert len(cited) > 10, "the citation pattern finds nothing?"
    missing = [c for c in cited if c[2] not in sections[c[1]]]
    assert not missing, f"sections cited but not in the document: {missing}"


# -- each checker, on an example that breaks its rule ---------------------------------------------


def test_checker_private_uses() -> None:
    assert private_uses("from modality_link.archive import _padded\n") == ["modality_link.archive._padded"]
    assert private_uses("from modality_link import archive\narchive._padded(b'')\n") == ["archive._padded"]
    assert private_uses("import modality_link._x\n") == ["modality_link._x"]
    assert private_uses("from modality_link.ipc import IpcClient\nimport os\nos._exit\n") == []


def test_checker_sql_uses() -> None:
    assert sql_uses("import sqlite3\n") == ["import sqlite3"]
    assert sql_uses("def f(con):\n    con.executemany('x', [])\n") == ["line 2: .executemany("]
    assert sql_uses("import json\n") == []


def test_checker_jsonrpc_framing() -> None:
    assert jsonrpc_framing('msg = {"jsonrpc": "2.0", "id": 1}\n') == ['line 1: the "jsonrpc" member']
    assert jsonrpc_framing("CODE = -32601\n") == ["line 1: JSON-RPC error code -32601"]
    assert jsonrpc_framing("import json\nimport socket\n") == ["JSON and a socket in one module"]
    assert jsonrpc_framing('"""Speaks JSON-RPC (jsonrpc 2.0)."""\nimport json\n') == []


def test_checker_imports_module() -> None:
    target = "modality_link.ipc"
    assert imports_module("from modality_link.ipc import IpcError\n", "modality_link/x.py", target)
    assert imports_module("def f():\n    from modality_link import ipc\n", "modality_link/x.py", target)
    assert imports_module("from .. import ipc\n", "modality_link/net/x.py", target)
    assert not imports_module("from modality_link import config\n", "modality_link/x.py", target)


def test_checker_forbidden_citations() -> None:
    bad = '"""Sends the mapping (B14)."""\n# seed 003 does it; see REQUIREMENTS §12 and shared/DESIGN.md\n'
    found = forbidden_citations(bad)
    for hit in ("B14", "seed 003", "REQUIREMENTS", "shared/", "DESIGN.md"):
        assert any(hit in f for f in found), (hit, found)
    assert forbidden_citations("# ARTIM (PS3.8 §9.1.5), status A700, tag (0008,0005), seed=2, G1\n") == []


def test_checker_cited_sections() -> None:
    text = '# the cap (docs/design.md "The listening\n#: side") and (docs/design.md, "Decoders")\n'
    assert cited_sections(text) == [("docs/design.md", "The listening side"), ("docs/design.md", "Decoders")]
