"""The package as users meet it: the top-level names, the py.typed marker, return annotations
on the public functions, and a TypeError naming the argument for a non-tensor given to the
operators."""
import ast
import re
import sys
from pathlib import Path

import pytest
import torch

import coupled_mamba_ext
from conftest import make_scan_inputs
from coupled_mamba_ext import coupled_selective_scan, coupled_selective_state_update
from coupled_mamba_ext import models

PACKAGE_DIR = Path(coupled_mamba_ext.__file__).resolve().parent
REPO_ROOT = Path(__file__).resolve().parents[1]


def test_layer_and_stack_import_from_the_top_level():
    from coupled_mamba_ext import CoupledMamba, CoupledMambaLayer, CoupledMambaStack
    assert CoupledMambaLayer is models.CoupledMambaLayer
    assert CoupledMambaStack is models.CoupledMambaStack
    assert CoupledMamba is models.CoupledMamba
    for name in coupled_mamba_ext.__all__:
        assert hasattr(coupled_mamba_ext, name), name
    assert {"CoupledMambaLayer", "CoupledMambaStack",
            "coupled_selective_scan_fn"} <= set(coupled_mamba_ext.__all__)


def test_py_typed_is_shipped():
    """Run against the installed wheel (make test), the first check is the wheel's content."""
    assert (PACKAGE_DIR / "py.typed").is_file(), f"no py.typed in {PACKAGE_DIR}"
    pyproject = REPO_ROOT / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip(f"{pyproject} is absent (tests run outside the source tree)")
    if sys.version_info < (3, 11):
        pytest.skip("reading pyproject.toml needs tomllib (Python 3.11)")
    import tomllib
    config = tomllib.loads(pyproject.read_text())
    package_data = config["tool"]["setuptools"]["package-data"]
    assert "py.typed" in package_data["coupled_mamba_ext"]


def _public_functions_without_return_annotation(path: Path):
    """(line, qualified name) of every public function or method of a public class in
    ``path`` that has no return annotation (__init__ excepted)."""
    missing = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef) and not child.name.startswith("_"):
                visit(child, prefix + child.name + ".")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = child.name
                dunder = name.startswith("__") and name.endswith("__")
                if (dunder and name != "__init__") or not name.startswith("_"):
                    if child.returns is None:
                        missing.append((child.lineno, prefix + name))

    visit(ast.parse(path.read_text()), "")
    return missing


def test_public_functions_have_return_annotations():
    sources = sorted(PACKAGE_DIR.rglob("*.py"))
    assert len(sources) > 10, f"package sources not found under {PACKAGE_DIR}"
    missing = [f"{path.relative_to(PACKAGE_DIR)}:{line} {name}" for path in sources
               for line, name in _public_functions_without_return_annotation(path)]
    assert not missing, "public functions without a return annotation:\n" + "\n".join(missing)


def test_the_annotation_check_finds_a_missing_one(tmp_path):
    source = tmp_path / "example.py"
    source.write_text("def shown(x):\n    return x\n\n\ndef _hidden(x):\n    return x\n\n\n"
                      "class Public:\n    def __init__(self):\n        pass\n\n"
                      "    def method(self) -> int:\n        return 1\n\n"
                      "    def __len__(self):\n        return 0\n")
    assert _public_functions_without_return_annotation(source) == [(1, "shown"),
                                                                    (16, "Public.__len__")]


M, BATCH, DIM, L, N = 2, 2, 3, 4, 4


def scan_inputs():
    return make_scan_inputs(M, BATCH, DIM, L, N, seed=0)


def state_update_inputs():
    x = make_scan_inputs(M, BATCH, DIM, 1, N, seed=0)
    step = {k: x[k][..., 0] for k in ("u", "delta", "z", "B", "C")}
    return dict(state=x["initial_state"], **step, A=x["A"], D=x["D"],
                delta_bias=x["delta_bias"], delta_softplus=True, coupling=x["coupling"])


SCAN_TENSORS = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "coupling",
                "initial_state"]
STATE_UPDATE_TENSORS = ["state", "u", "delta", "A", "B", "C", "D", "z", "delta_bias",
                        "coupling"]
OPTIONAL = {"D", "z", "delta_bias", "coupling", "initial_state"}
CASES = ([("coupled_selective_scan", name) for name in SCAN_TENSORS]
         + [("coupled_selective_state_update", name) for name in STATE_UPDATE_TENSORS])


@pytest.mark.parametrize("op,name", CASES, ids=[f"{op.split('_')[-1]}-{n}" for op, n in CASES])
@pytest.mark.parametrize("wrong", ["list", "ndarray"])
def test_a_non_tensor_argument_gets_a_type_error_naming_it(op, name, wrong):
    inputs = scan_inputs() if op == "coupled_selective_scan" else state_update_inputs()
    tensor = inputs[name]
    inputs[name] = list(tensor.unbind(0)) if wrong == "list" else tensor.numpy()
    received = "list" if wrong == "list" else "ndarray"
    expected = "a torch.Tensor" + (" or None" if name in OPTIONAL else "")
    fn = {"coupled_selective_scan": coupled_selective_scan,
          "coupled_selective_state_update": coupled_selective_state_update}[op]
    with pytest.raises(TypeError, match=re.escape(
            f"{op}: argument '{name}' expected {expected}, got {received}")):
        fn(**inputs)


def test_a_list_hints_at_stacking_and_the_mamba_entry_point():
    inputs = scan_inputs()
    inputs["u"] = list(inputs["u"].unbind(0))
    with pytest.raises(TypeError, match=re.escape(
            "argument 'u' expected a torch.Tensor, got list; stack per-modality tensors along "
            "a new first dim (M, ...), or pass the lists to coupled_selective_scan_fn")):
        coupled_selective_scan(**inputs)


def test_a_positional_call_written_for_mamba_ssm_is_pointed_to_the_mamba_entry_point():
    x = scan_inputs()
    with pytest.raises(TypeError, match=re.escape(
            "coupled_selective_scan: argument 'coupling' expected a torch.Tensor or None, got "
            "bool; a positional call written for mamba_ssm's selective_scan_fn")):
        coupled_selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                               x["delta_bias"], True, True)
