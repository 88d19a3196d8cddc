"""Every docstring example in natgrad runs, and each such module runs at least one."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest

import natgrad

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


def modules_with_examples() -> list[str]:
    root = Path(natgrad.__file__).parent
    names = []
    for info in pkgutil.walk_packages([str(root)], prefix="natgrad."):
        path = root.joinpath(*info.name.split(".")[1:])
        source = path / "__init__.py" if info.ispkg else path.with_suffix(".py")
        if ">>>" in source.read_text():
            names.append(info.name)
    return sorted(names)


def test_the_known_examples_are_found():
    """The class examples of the README's two entry points are among them."""
    assert {
        "natgrad.rat",
        "natgrad.supervised.natural_gradient",
        "natgrad.supervised.optimizer",
    } <= set(modules_with_examples())


@pytest.mark.parametrize("name", modules_with_examples())
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    failures, attempted = doctest.testmod(module, verbose=False, optionflags=doctest.ELLIPSIS)
    assert attempted > 0, f"{name} has '>>>' but doctest ran no example"
    assert failures == 0
