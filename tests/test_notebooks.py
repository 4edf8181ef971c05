"""Every notebook in notebooks/ runs top to bottom, at its small size (GPR_SIM_SMALL=1).

Timings at the small size (2 CPU cores, one torch thread): 03_pretraining ~15 s, 04_hepo_vs_ppo ~40 s
(6 tiny agents.hepo runs); none is over 60 s, so none is marked slow.
"""

import json
import sys
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
KERNEL = "gpr-sim-tests"
REPO = NOTEBOOK_DIR.parent
WRITES = {
    "03_pretraining.ipynb": [
        "runs/notebooks/03_pretraining/small/" + f
        for f in ("mtp/metrics.jsonl", "vaft/metrics.jsonl", "vaft/summary.json", "pretrain.png")
    ],
    "04_hepo_vs_ppo.ipynb": [
        "runs/notebooks/04_hepo_vs_ppo/small/" + f
        for f in (
            "curves.png",
            "final.png",
            "report/table3.csv",
            "report/table3.md",
            "report/final_table.csv",
            "report/final_table.md",
            "report/final.png",
            "report/table4.md",
            "report/table5.md",
            "baselines/summary.json",
            *(f"{a}__{s}/summary.json" for a in ("hepo", "ppo", "grpo") for s in (0, 1)),
        )
    ],
    "06_per_level_credit.ipynb": ["runs/notebooks/06_per_level_credit/small/sweep.png"],
}
"""files a notebook's small run must leave behind (relative to the repository root)"""


@pytest.fixture
def kernel_name(tmp_path, monkeypatch):
    """A kernel spec for *this* interpreter, first on JUPYTER_PATH: a user-level "python3" spec
    pointing at another Python can then never be picked up, and nothing needs installing by hand."""
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "gpr-sim tests",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("GPR_SIM_SMALL", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel's torch: one thread, like the tests
    return KERNEL


@pytest.mark.skipif(not NOTEBOOKS, reason="no notebooks in notebooks/")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, kernel_name):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, kernel_name=kernel_name, timeout=120, resources={"metadata": {"path": str(REPO)}}
    )
    client.execute()  # raises CellExecutionError naming the cell on any error
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"
    ]
    assert not errors
    # every code cell ran, and the notebook showed something (tables or figures)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)
    assert any(o.output_type in ("execute_result", "display_data") for c in code for o in c.outputs)
    missing = [f for f in WRITES.get(path.name, []) if not (REPO / f).is_file()]
    assert not missing, f"{path.name} did not write {missing}"
