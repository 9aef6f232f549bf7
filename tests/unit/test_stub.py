"""The _C.pyi stub that ships with the package describes the compiled module:
every name it declares exists in deepspeed_pipe_ext._C, every public name of
the module is declared, and every member a stub class declares exists."""
import ast
import pathlib

import pytest

import deepspeed_pipe_ext
from deepspeed_pipe_ext._native import _C

STUB = pathlib.Path(deepspeed_pipe_ext.__file__).with_name("_C.pyi")
# Names the stub defines for typing only.
TYPE_ONLY = {"_Enum", "Kind", "Layout", "Instruction", "Steps", "Timeline", "TraceEvent", "Value", "StageCallbacks"}


def stub_declarations():
    tree = ast.parse(STUB.read_text())
    declared = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            members = {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
            members |= {n.target.id for n in node.body if isinstance(n, ast.AnnAssign)}
            declared[node.name] = members - {"__init__", "__members__", "__int__"}
        elif isinstance(node, ast.FunctionDef):
            declared[node.name] = set()
        elif isinstance(node, ast.Assign):
            declared.update({t.id: set() for t in node.targets})
    return declared


def test_the_stub_and_the_module_declare_the_same_names():
    declared = stub_declarations()
    public = {name for name in dir(_C) if not name.startswith("_")}
    assert public - set(declared) == set(), "in _C but not in _C.pyi"
    assert set(declared) - TYPE_ONLY - public == set(), "in _C.pyi but not in _C"


@pytest.mark.parametrize("name", sorted(set(stub_declarations()) - TYPE_ONLY))
def test_each_stub_class_member_exists(name):
    obj = getattr(_C, name)
    for member in stub_declarations()[name]:
        assert hasattr(obj, member), f"_C.{name}.{member} is declared in _C.pyi but missing"
