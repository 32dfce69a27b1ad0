"""The type stubs (python/llmflash/_native.pyi) describe the native module as built: every public
name, every public member of each class, and each callable's parameter names, so that type
checkers and editors see what llmflash._native really offers (house style: ship a .pyi)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import llmflash._native as native

STUB = Path(native.__file__).with_name("_native.pyi")


def _stub() -> ast.Module:
    return ast.parse(STUB.read_text(), filename=str(STUB))


def _public(names) -> set[str]:
    return {n for n in names if not n.startswith("_")}


def _declared() -> dict[str, ast.AST]:
    """Top-level public names of the stub: classes, functions, annotated constants."""
    out: dict[str, ast.AST] = {}
    for node in _stub().body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            out[node.name] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
    return {k: v for k, v in out.items() if not k.startswith("_")}


def _params(fn: ast.FunctionDef) -> list[str]:
    a = fn.args
    return [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)]


def _native_params(obj) -> list[str] | None:
    try:
        return [p for p in inspect.signature(obj).parameters]
    except (TypeError, ValueError):  # no __text_signature__ (e.g. a slot wrapper)
        return None


def test_stub_names_every_public_name_of_the_module_and_no_other():
    assert _public(dir(native)) == set(_declared())


@pytest.mark.parametrize("name", sorted(k for k, v in _declared().items() if isinstance(v, ast.ClassDef)))
def test_stub_class_members_match(name):
    node = _declared()[name]
    members = {b.name for b in node.body if isinstance(b, ast.FunctionDef)}
    assert _public(dir(getattr(native, name))) == _public(members), name


def _callables():
    for node in _declared().values():
        if isinstance(node, ast.FunctionDef):
            yield node.name, node, getattr(native, node.name)
        elif isinstance(node, ast.ClassDef):
            cls = getattr(native, node.name)
            for b in node.body:
                if not isinstance(b, ast.FunctionDef) or b.decorator_list or b.name.startswith("__"):
                    continue  # properties and dunders: no parameters to compare
                if b.name == "__init__":
                    continue
                yield f"{node.name}.{b.name}", b, getattr(cls, b.name)
            init = next((b for b in node.body if isinstance(b, ast.FunctionDef) and b.name == "__init__"), None)
            if init is not None:
                yield f"{node.name}.__init__", init, cls


@pytest.mark.parametrize("qual", sorted(q for q, _, _ in _callables()))
def test_stub_parameter_names_match(qual):
    node, obj = next((n, o) for q, n, o in _callables() if q == qual)
    real = _native_params(obj)
    assert real is not None, f"{qual}: the native callable has no signature to compare"
    stub = _params(node)
    if stub and stub[0] == "self" and (not real or real[0] != "self"):
        stub = stub[1:]  # a class's signature omits self
    assert stub == real, qual


def test_the_test_only_fault_hook_is_declared_private():
    """The reader's fault-injection hook (tests/test_faults.py) is reachable only through
    underscore names, each declared in the stub with the module's parameter names."""
    private = {n for n in dir(native) if "fault" in n}
    assert private == {"_inject_fault", "_clear_faults", "_faults_fired"}
    stub = {node.name: node for node in _stub().body if isinstance(node, ast.FunctionDef)}
    for name in private:
        assert _params(stub[name]) == _native_params(getattr(native, name)), name
