"""The import graph of the library: layers import only downward, a method never imports another method, and nothing
in the library imports a method but the benchmark's registry of methods (`nucbook.bench.benchmark`), which reaches each
method through its `bench_rows`.

Layers: core -> data -> augment / eval -> models -> engine -> methods -> bench -> cli. `augment` and `eval` share a rank
and must not import each other. Imports inside functions count too."""
import ast
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {'core': 0, 'data': 1, 'augment': 2, 'eval': 2, 'models': 3, 'engine': 4, 'methods': 5, 'bench': 6, 'cli': 7}
UNLAYERED = {'__init__', '_modidx'}  # the package root: version, docstring and nbdev's index
METHOD_REGISTRY = {'nucbook.bench.benchmark'}  # the one library module that imports the methods (each through `bench_rows`)


def module_name(path:Path, pkg_root:Path) -> str:
    "`nucbook/engine/train.py` -> 'nucbook.engine.train'; a package's `__init__.py` -> the package."
    parts = list(path.relative_to(pkg_root.parent).with_suffix('').parts)
    if parts[-1] == '__init__': parts = parts[:-1]
    return '.'.join(parts)


def imported_modules(path:Path, pkg_root:Path) -> list[tuple[int, str]]:
    "(line, absolute module) of every nucbook import in `path`, relative ones resolved, `from x import y` as x.y too."
    name = module_name(path, pkg_root)
    is_pkg = path.name == '__init__.py'
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split('.')[0] == pkg_root.name]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split('.') if is_pkg else name.split('.')[:-1]
                base = base[:len(base) - (node.level - 1)]
                mod = '.'.join(base + ([node.module] if node.module else []))
            else: mod = node.module or ''
            if mod.split('.')[0] != pkg_root.name: continue
            out.append((node.lineno, mod))
            out += [(node.lineno, f'{mod}.{a.name}') for a in node.names if a.name != '*']
    return out


def layer_of(mod:str) -> str|None:
    "The layer of an absolute module name ('nucbook.engine.train' -> 'engine'); None for the package root."
    parts = mod.split('.')
    if len(parts) < 2 or parts[1] in UNLAYERED: return None
    return parts[1] if parts[1] in LAYERS else None


def violations(pkg_root:Path) -> list[str]:
    "Every import that breaks the layer rules, as 'file:line: message'."
    bad = []
    for path in sorted(pkg_root.rglob('*.py')):
        src_mod = module_name(path, pkg_root); src = layer_of(src_mod)
        if src is None:
            if path.parent == pkg_root and path.stem not in UNLAYERED:
                bad.append(f'{path}: module {src_mod} belongs to no layer (known: {", ".join(LAYERS)})')
            continue
        for line, mod in imported_modules(path, pkg_root):
            dst = layer_of(mod)
            if dst is None or dst == src:
                # within one layer: a method never imports another method
                if src == dst == 'methods' and len(mod.split('.')) > 2 and len(src_mod.split('.')) > 2 \
                        and mod.split('.')[2] != src_mod.split('.')[2]:
                    bad.append(f'{path}:{line}: method {src_mod} imports another method {mod}')
                continue
            if dst == 'methods':
                if src_mod.replace(pkg_root.name, 'nucbook', 1) in METHOD_REGISTRY: continue  # the benchmark's registry (bench, above methods)
                bad.append(f'{path}:{line}: {src_mod} imports the method {mod} (nothing in the library imports a method)')
            elif LAYERS[dst] >= LAYERS[src]:
                bad.append(f'{path}:{line}: {src_mod} ({src}) imports {mod} ({dst}): imports only go down '
                           f'({" -> ".join(LAYERS)})')
    return bad


def test_library_import_graph_follows_the_layers():
    bad = violations(ROOT/'nucbook')
    assert not bad, 'layer violations:\n' + '\n'.join(bad)


def private_imports(pkg_root:Path) -> list[str]:
    "Every `from <another nucbook module> import _private`: such helpers must be made public or moved."
    bad = []
    for path in sorted(pkg_root.rglob('*.py')):
        if path.stem == '_modidx': continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or '').split('.')[0] == pkg_root.name):
                names = [a.name for a in node.names if a.name.startswith('_') and not a.name.startswith('__')]
                if names: bad.append(f'{path}:{node.lineno}: imports private {", ".join(names)} from another module')
    return bad


def test_no_private_helpers_cross_modules():
    bad = private_imports(ROOT/'nucbook')
    assert not bad, '\n'.join(bad)


def test_private_import_checker(tmp_path):
    root = _tree(tmp_path, {'engine/train.py': 'from .infer import _autocast\nfrom ..core import get_device\n'})
    assert len(private_imports(root)) == 1 and '_autocast' in private_imports(root)[0]


def test_every_layer_is_a_subpackage():
    for layer in LAYERS:
        p = ROOT/'nucbook'/(f'{layer}.py' if layer == 'cli' else layer)
        assert p.exists(), f'{p} missing'
    assert (ROOT/'nucbook'/'methods'/'insmix.py').exists()


def _tree(tmp_path, files:dict) -> Path:
    root = tmp_path/'nucbook'
    for rel, text in {'__init__.py': '', **files}.items():
        (root/rel).parent.mkdir(parents=True, exist_ok=True); (root/rel).write_text(text)
    return root


@pytest.mark.parametrize('files, expect', [
    ({'data/x.py': 'from ..engine.train import Trainer\n'}, 'imports only go down'),   # upward, relative
    ({'core/base.py': 'import nucbook.data.sample\n'}, 'imports only go down'),        # upward, absolute
    ({'augment/mix.py': 'def f():\n    from ..eval.metrics import aji\n'}, 'imports only go down'),  # sibling, lazy
    ({'methods/a.py': 'from .b import f\n', 'methods/b.py': ''}, 'another method'),   # method -> method
    ({'bench/p.py': 'from ..methods import insmix\n'}, 'imports the method'),         # library -> method
    ({'bench/benchmark.py': 'from ..cli import run\n'}, 'imports only go down'),      # the registry is still in its layer
    ({'engine/benchmark.py': 'from ..methods import insmix\n'}, 'imports the method'),  # only bench.benchmark is the registry
    ({'cli.py': 'from nucbook.methods.insmix import InsMix\n'}, 'imports the method'),
    ({'stray.py': ''}, 'belongs to no layer'),
])
def test_checker_catches_violations(tmp_path, files, expect):
    bad = violations(_tree(tmp_path, files))
    assert any(expect in b for b in bad), bad


def test_checker_allows_downward_and_same_layer(tmp_path):
    root = _tree(tmp_path, {'engine/train.py': 'from ..core import x\nfrom ..data.sample import Sample\nfrom .infer import y\n'
                                               'from nucbook.models.hovernet import HoVerNet\n',
                            'methods/insmix.py': 'from ..augment.canvas import Canvas\nfrom ..engine.loop import L\n',
                            'bench/protocol.py': 'from ..engine.train import Trainer\n', 'cli.py': 'from .bench import protocol\n',
                            'bench/benchmark.py': 'from nucbook.methods import insmix, diffmix\nfrom ..methods.gong import bench_rows\n'})
    assert violations(root) == []
