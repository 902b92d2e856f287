"""Write client/strongroom/_async_resources.pyi: the async client's namespaces, for type checkers.

Both clients share the namespace classes in ``_resources.py``; at run time
``AsyncClient``'s ``_call`` returns an awaitable, so each method returns one.
Python's typing cannot say "the same methods, awaited" of one class, so this
stub declares them: every public method of every namespace, its parameters
copied, as ``async def`` with the same return type. Regenerate after
changing ``_resources.py``::

    .venv/bin/python -m tests.client.async_stub

tests/client/test_typing.py fails while the stub is out of date.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

CLIENT = Path(__file__).resolve().parents[2] / "client" / "strongroom"
SOURCE = CLIENT / "_resources.py"
STUB = CLIENT / "_async_resources.pyi"
RUFF = Path(sys.executable).with_name("ruff")

HEADER = '''"""The async client's namespaces (``AsyncClient.keys`` ...), for type checkers.

Generated from _resources.py by tests/client/async_stub.py; do not edit.
At run time they are the classes of _resources.py, whose methods return
awaitables when the client is an AsyncClient.
"""

'''


def _imports(tree: ast.Module) -> list[str]:
    lines = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            lines.append(ast.unparse(node))
        elif isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            lines += [ast.unparse(n) for n in node.body if isinstance(n, ast.ImportFrom)]
    return lines


def _is_overload(fn: ast.FunctionDef) -> bool:
    return any(ast.unparse(d) in ("overload", "typing.overload") for d in fn.decorator_list)


def render() -> str:
    tree = ast.parse(SOURCE.read_text())
    out = [HEADER.rstrip("\n") + "\n", "import builtins", *_imports(tree), ""]
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        if not any(ast.unparse(b) == "_Namespace" for b in node.bases):
            continue
        out += ["", f"class Async{node.name}:"]
        doc = ast.get_docstring(node)
        if doc:
            out.append(f"    {ast.unparse(ast.Expr(ast.Constant(doc.splitlines()[0])))}")
        out.append("    def __init__(self, client: BaseClient) -> None: ...")
        methods = [
            m for m in node.body if isinstance(m, ast.FunctionDef) and not m.name.startswith("_")
        ]
        overloaded = {m.name for m in methods if _is_overload(m)}
        for item in methods:
            if item.name in overloaded and not _is_overload(item):
                continue  # a stub declares only the overloads
            fn = ast.AsyncFunctionDef(
                name=item.name,
                args=item.args,
                body=[ast.Expr(ast.Constant(...))],
                decorator_list=[ast.Name("overload")] if _is_overload(item) else [],
                returns=item.returns,
                type_comment=None,
                type_params=[],
            )
            text = ast.unparse(ast.fix_missing_locations(fn))
            # A method named "list" shadows the builtin inside the class body.
            text = text.replace("-> list[", "-> builtins.list[")
            out += ["    " + line for line in text.splitlines()]
    return _tidy("\n".join(out) + "\n")


def _tidy(text: str) -> str:
    """Drop unused imports, sort them and format, as ``ruff check/format .`` wants it."""
    for args in (["check", "--fix", "--quiet", "--select", "F401,I001"], ["format"]):
        text = subprocess.run(
            [RUFF, *args, "--stdin-filename", str(STUB), "-"],
            input=text,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    return text


def main() -> int:
    STUB.write_text(render())
    print(f"wrote {STUB}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
