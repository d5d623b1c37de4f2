"""The tutorials: committed without outputs, and each runs top to bottom without error.

Every ``tutorials/*.ipynb`` is picked up (sorted), so new notebooks are tested without editing
this file. Each is executed with nbclient in a fresh ``python3`` kernel, with ``tutorials/`` as
the working directory (so ``import figures`` works). jupyter_client starts that kernel with the
interpreter running pytest (it replaces the kernelspec's ``python`` by ``sys.executable``); a cell
prepended here checks it, so a notebook can never pass by running in some other environment.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
NOTEBOOK_TIMEOUT_S = 600  # for the whole notebook, not per cell


def _read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def test_tutorials_exist() -> None:
    assert NOTEBOOKS, f"no notebooks found in {TUTORIALS}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path: Path) -> None:
    nb = _read(path)
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        assert cell.outputs == [], f"{path.name}, cell {index}: clear the outputs before committing"
        assert cell.execution_count is None, f"{path.name}, cell {index}: clear the execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path: Path) -> None:
    nb = _read(path)
    check = nbformat.v4.new_code_cell(f"import sys\nassert sys.prefix == {sys.prefix!r}, sys.prefix")
    check.id = "environment-check"
    nb.cells.insert(0, check)
    deadline = time.monotonic() + NOTEBOOK_TIMEOUT_S
    client = NotebookClient(
        nb,
        kernel_name="python3",
        # each cell may use what is left of the notebook's budget
        timeout_func=lambda cell: max(1, int(deadline - time.monotonic())),
        resources={"metadata": {"path": str(TUTORIALS)}},
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on failure
