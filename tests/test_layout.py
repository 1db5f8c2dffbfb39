"""The package's layout: no import cycle, the registry a leaf, the pieces apart from the methods and the run."""
import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'timm_selfkd')


def _module_name(path: str) -> str:
    relative = os.path.relpath(path, os.path.dirname(PACKAGE))[:-len('.py')].replace(os.sep, '.')
    return relative[:-len('.__init__')] if relative.endswith('.__init__') else relative


def import_graph(type_checking: bool = False):
    """Module -> the package modules it imports (anywhere in its source; type-checking blocks only with
    `type_checking`, as they make no cycle at run time but still tie one layer to another)."""
    modules = {}
    for folder, _, files in os.walk(PACKAGE):
        for file in files:
            if file.endswith('.py'):
                path = os.path.join(folder, file)
                modules[_module_name(path)] = path
    graph = {}
    for name, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read())
        type_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                     and getattr(block.test, 'id', '') == 'TYPE_CHECKING' for node in ast.walk(block)}
        targets = set()
        for node in ast.walk(tree):
            if (id(node) in type_only and not type_checking) or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, ast.Import):
                found = [alias.name for alias in node.names]
            else:
                assert node.level == 0, f'{name}: relative import (the package imports by absolute names)'
                found = [node.module] + [f'{node.module}.{alias.name}' for alias in node.names]
            targets.update(m for m in found if m in modules and m != name)
        graph[name] = targets
    return graph


def _cycle(graph):
    """One import cycle as a list of modules, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = 'open'
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 'open':
                return stack[stack.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        state[node] = 'done'
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 20
    assert _cycle(graph) is None, ' -> '.join(_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': set()}) == ['a', 'b', 'c', 'a']


@pytest.mark.parametrize('leaf', ['timm_selfkd.registry', 'timm_selfkd.errors', 'timm_selfkd.run_facts'])
def test_leaves_import_nothing_of_the_package(leaf):
    assert import_graph(type_checking=True)[leaf] == set()


ENTRY_POINTS = {'timm_selfkd.train', 'timm_selfkd.upstream', 'timm_selfkd.cli', 'timm_selfkd.wiring',
                'timm_selfkd.options', 'timm_selfkd.export', 'timm_selfkd.model_card'}


@pytest.mark.parametrize('layer, forbidden', [
    ('timm_selfkd.components', ('timm_selfkd.methods', 'timm_selfkd.runtime')),
    ('timm_selfkd.runtime', ('timm_selfkd.methods', 'timm_selfkd.components')),
])
def test_the_layers_below_the_methods_import_only_leaves(layer, forbidden):
    """components/ (the pieces methods compose) and runtime/ (the run machinery) import neither a method, nor each
    other, nor an entry point; what they share with the methods is in the leaves (run_facts, errors, registry)."""
    for module, targets in import_graph(type_checking=True).items():
        if module.startswith(layer + '.'):
            bad = {t for t in targets if t.startswith(forbidden) or t in ENTRY_POINTS}
            assert not bad, f'{module} imports {bad}'
