"""Executes every notebook in notebooks/ in tiny mode (DFKD_NOTEBOOK_TINY=1) with nbclient.

The kernel is the `python3` kernel run by this interpreter (jupyter_client starts a kernelspec
whose command is `python` with `sys.executable`), so it sees this virtual environment. The
notebooks run from notebooks/, as Jupyter would start them; 01 and 03 share one run folder, so
03 reuses the teacher and DAFL run of 01 (it makes them itself when run alone).
"""
import glob
import json
import os
import time

import pytest

import helpers

nbformat = pytest.importorskip("nbformat", reason="needs the 'dev' extra (pip install -e .[dev])")
nbclient = pytest.importorskip("nbclient", reason="needs the 'dev' extra (pip install -e .[dev])")

pytestmark = pytest.mark.slow

NOTEBOOKS_DIR = os.path.join(helpers.REPO_ROOT, "notebooks")
NOTEBOOKS = ("01_quickstart.ipynb", "02_functional_ops.ipynb", "03_compare_methods.ipynb")
TINY_ENV = "DFKD_NOTEBOOK_TINY"


def _read(name):
  return nbformat.read(os.path.join(NOTEBOOKS_DIR, name), as_version=4)


def _execute(name, workdir):
  """Runs a notebook in tiny mode; returns (executed notebook, seconds)."""
  nb = _read(name)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, like users
  env.update({TINY_ENV: "1", "DFKD_NOTEBOOK_WORKDIR": str(workdir), "PYTHONWARNINGS": "ignore",
              "TF_CPP_MIN_LOG_LEVEL": "3"})
  client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                   resources={"metadata": {"path": NOTEBOOKS_DIR}})
  t0 = time.perf_counter()
  client.execute(env=env)  # raises CellExecutionError (with the cell's traceback) on failure
  seconds = time.perf_counter() - t0
  print(f"{name}: {seconds:.1f} s")
  return nb, seconds


def _outputs(nb):
  return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def _images(nb):
  return [o for o in _outputs(nb) if "image/png" in o.get("data", {})]


def _text(nb):
  parts = []
  for o in _outputs(nb):
    parts.append(o.get("text", ""))
    data = o.get("data", {})
    parts.append(data.get("text/markdown", "") + data.get("text/plain", ""))
  return "\n".join(parts)


@pytest.fixture(scope="module")
def shared_workdir(tmp_path_factory):
  helpers.require_fashion_mnist()
  return tmp_path_factory.mktemp("notebook_runs")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_committed_without_outputs(name):
  nb = _read(name)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(not c.outputs and c.execution_count is None for c in code), (
      f"{name} holds outputs: strip them before committing")
  first = code[0]
  assert f'TINY = os.environ.get("{TINY_ENV}", "0") == "1"' in first.source, (
      f"{name}: the first code cell must be the TINY parameter cell")
  assert "parameters" in first.metadata.get("tags", [])
  assert nb.metadata["kernelspec"]["name"] == "python3"


def test_quickstart(shared_workdir):
  nb, _ = _execute("01_quickstart.ipynb", shared_workdir)
  summary = json.loads((shared_workdir / "dafl" / "summary.json").read_text())
  assert summary["method"] == "dafl" and summary["iterations"] == 6  # the tiny budget
  assert (shared_workdir / "teacher" / "model.msgpack").is_file()
  assert (shared_workdir / "dafl" / "synthetic.png").is_file()
  assert len(_images(nb)) >= 1  # the synthetic grid and accuracy curve figure
  text = _text(nb)
  assert "teacher (lenet5_bn)" in text and "student (lenet5_half_bn) after 6 iterations" in text


def test_functional_ops(tmp_path):
  nb, _ = _execute("02_functional_ops.ipynb", tmp_path)
  text = _text(nb)
  assert "bn_l2:" in text and "bank: 2/4 slots filled" in text
  assert "10 student updates" in text
  assert len(_images(nb)) == 2  # the bank's images; the loss and agreement curves
  assert not list(tmp_path.iterdir())  # needs no run folder


def test_compare_methods(shared_workdir):
  nb, _ = _execute("03_compare_methods.ipynb", shared_workdir)
  for run in ("teacher", "dafl", "dafl_seed1", "dfad"):
    assert (shared_workdir / run / "summary.json").is_file(), run
  text = _text(nb)
  assert "| dafl | 2 |" in text and "| dfad | 1 |" in text and " ± " in text
  assert "4 runs in 3 groups" in text
  assert len(_images(nb)) == 2  # accuracy curves; robustness/time/memory bars


def test_notebook_list_is_complete():
  assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(NOTEBOOKS_DIR, "*.ipynb"))) \
      == sorted(NOTEBOOKS)
