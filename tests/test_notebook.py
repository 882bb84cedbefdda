"""The exploration notebook (launch/explore.ipynb) runs top to bottom on the smoke runs.

The pixel run, and the text run: a text-conditioned run in an autoencoder's latent space, so it
covers both the latent path (samples come decoded through the run layer) and sampling from
prompts. (A third run on the class-conditional latent smoke run added 15 s and no code path.)
"""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "launch" / "explore.ipynb"


@pytest.mark.parametrize("workdir", ["smoke_workdir", "text_workdir"])
def test_explore_notebook_runs_on_the_smoke_workdirs(workdir, request, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_JAX_WORKDIR", str(request.getfixturevalue(workdir)))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    )
    client.execute()  # raises CellExecutionError, with the cell's traceback, on any failure

    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert "finished students" in text and "teacher N= 16" in text
    assert ("prompts: ['a thick zero'" in text) == (workdir == "text_workdir")
    assert ("latent run: diffusion on (8, 8, 4) latents" in text) == (workdir == "text_workdir")
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) == 2  # the sample grids and the trade-off plot
