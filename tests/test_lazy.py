"""The names that automask and its subpackages load on first use (PEP 562)."""
from __future__ import annotations

import subprocess
import sys

import pytest

import automask
from automask import data, datasets, metrics, training


@pytest.mark.parametrize("package", [automask, data, datasets, metrics, training])
def test_an_unknown_name_is_an_attribute_error_naming_the_package(package):
    with pytest.raises(AttributeError, match=f"module '{package.__name__}' has no attribute "
                                             "'nope'"):
        package.nope  # noqa: B018
    assert not hasattr(package, "nope")


def test_each_listed_name_loads_its_submodule_once_and_stays():
    """In a fresh interpreter: a name's submodule is not imported until the name is read;
    then the name is the submodule's object, kept in the package."""
    code = (
        "import sys, automask.datasets as d\n"
        "before = 'automask.datasets.split' in sys.modules\n"
        "f = d.train_test_split\n"
        "from automask.datasets.split import train_test_split\n"
        "print(before, f is train_test_split, 'train_test_split' in vars(d))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    assert out.split() == ["False", "True", "True"], out
    for package in (automask, data, datasets, metrics, training):
        for name in getattr(package, "_SOURCES", getattr(package, "_LAZY", {})):
            assert getattr(package, name) is vars(package)[name]
