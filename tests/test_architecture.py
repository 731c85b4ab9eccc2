"""The package's layout holds: imports run one way, upstream internals stay behind one seam, functions stay short.

Layers, lowest first (a module may import its own layer and the ones below, never one above):

    0  tfp_nvp._compat, tfp_nvp.data, tfp_nvp.images     upstream seam, datasets
    1  tfp_nvp.nn (and its old name tfp_nvp.networks)    Keras networks
    2  tfp_nvp.bijectors                                 the math
    3  tfp_nvp.flows                                     builders
    4  tfp_nvp.models, tfp_nvp.inference                 the Keras seam, probabilistic programs
    5  tfp_nvp                                           the package's front door

Read from the source (every import statement, function-level ones included), so a lazy import cannot hide an
upward dependency or a cycle.
"""

from __future__ import annotations

import ast
import io
import os
import tokenize

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tfp_nvp")
LAYERS = {
    "tfp_nvp._compat": 0, "tfp_nvp.data": 0, "tfp_nvp.images": 0,
    "tfp_nvp.nn": 1, "tfp_nvp.networks": 1,
    "tfp_nvp.bijectors": 2,
    "tfp_nvp.flows": 3,
    "tfp_nvp.models": 4, "tfp_nvp.inference": 4,
    "tfp_nvp": 5,
}
UPSTREAM_INTERNALS = ("keras.src", "tensorflow.python", "tensorflow_probability.python")
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, str]:
    """Module name -> source path for every module of the package."""
    found = {}
    for root, _, files in os.walk(PACKAGE):
        for file in files:
            if file.endswith(".py"):
                path = os.path.join(root, file)
                rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                found[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return found


MODULES = _modules()
TREES = {name: ast.parse(open(path).read(), filename=path) for name, path in MODULES.items()}


def _layer(module: str) -> int:
    while module not in LAYERS:
        module = module.rpartition(".")[0]
    return LAYERS[module]


def _imports(module: str) -> set[str]:
    """The package modules `module` imports (`from tfp_nvp import nn` names the module tfp_nvp.nn)."""
    found = set()
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("tfp_nvp"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tfp_nvp"):
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in MODULES else node.module)
    return found


def test_the_layer_table_covers_every_module():
    assert {"tfp_nvp.nn", "tfp_nvp.bijectors", "tfp_nvp.flows", "tfp_nvp.models", "tfp_nvp.inference"} <= set(MODULES)
    for module in MODULES:
        _layer(module)  # raises KeyError for a module outside every layer


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_a_higher_layer(module):
    upward = sorted(m for m in _imports(module) if _layer(m) > _layer(module))
    assert not upward, f"{module} (layer {_layer(module)}) imports higher layers: {upward}"


def test_no_import_cycles():
    graph = {m: _imports(m) - {m} for m in MODULES}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_lookups_by_name_and_upstream_internals_only_through_the_seam(module):
    for node in ast.walk(TREES[module]):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            assert name != "importlib", f"{module} imports importlib: name the module it needs instead"
            if module != "tfp_nvp._compat":
                assert not name.startswith(UPSTREAM_INTERNALS), (
                    f"{module} imports {name}: upstream internals go through tfp_nvp._compat")


def _code_lines(path: str) -> set[int]:
    """Line numbers holding code: not blank, not only a comment, not part of a docstring."""
    source = open(path).read()
    lines = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                              tokenize.ENDMARKER):
            lines.update(range(token.start[0], token.end[0] + 1))
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                lines -= set(range(first.lineno, first.end_lineno + 1))
    return lines


def test_no_function_is_longer_than_80_lines_of_code():
    long = []
    for module, path in MODULES.items():
        code = _code_lines(path)
        for node in ast.walk(TREES[module]):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                count = len(code & set(range(node.lineno, node.end_lineno + 1)))
                if count > MAX_FUNCTION_LINES:
                    long.append(f"{module}.{node.name}: {count}")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines of code: {long}"


# The public names of tfp_nvp before its modules moved into folders: each must keep importing from the package
# root, and the module names users imported keep working.
EARLIER_PUBLIC_NAMES = (
    "ActNorm", "AffineCoupling", "ConditionalAffine", "ConditionedFlow", "FactorOut", "FlowLayer", "FlowModel",
    "FusedAdam", "InverseAutoregressive", "Invertible1x1Conv", "InvertibleChain", "LeakyReLU", "LogitTransform",
    "MaskedAutoregressive", "NegativeLogLikelihood", "OnChannels", "SplineCoupling", "Squeeze",
    "WarmupCosineDecay", "condition", "conditional_kwargs", "data", "export_flow", "ffjord", "flow_bijectors",
    "flow_layers", "glow", "iaf", "images", "initialize", "maf", "networks", "neutra_initial_state",
    "neutra_kernel", "neutra_trace_fn", "real_nvp", "spline_flow", "standard_normal", "surrogate_posterior",
)


def test_earlier_public_names_and_modules_still_import():
    import tfp_nvp
    import tfp_nvp.data
    import tfp_nvp.images
    import tfp_nvp.networks

    assert set(EARLIER_PUBLIC_NAMES) <= set(tfp_nvp.__all__)
    for name in tfp_nvp.__all__:
        assert getattr(tfp_nvp, name) is not None, name
    for name in ("DenseNetwork", "ConvResNet", "MADE", "MaskedDense"):
        assert getattr(tfp_nvp.networks, name) is getattr(tfp_nvp.nn, name), name
    assert callable(tfp_nvp.initialize) and callable(tfp_nvp.data.two_moons) and callable(tfp_nvp.images.dequantize)
