import atexit
import os
import shutil
import tempfile

# Deterministic, quiet CPU runs; torch shares the 2 cores with XLA.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Many tests compile the same programs (the tiny config's steps, in this process and in the `deme` commands they
# start): JAX's persistent compilation cache, empty at the start of each session unless one is given, compiles each
# once. Set JAX_COMPILATION_CACHE_DIR to keep a cache between sessions.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="deme-jax-tests-xla-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

import torch  # noqa: E402

torch.set_num_threads(2)

import jax  # noqa: E402
import pytest  # noqa: E402

from tests.runs import CONFIG, deme  # noqa: E402


@pytest.fixture(autouse=True)
def full_precision_for_references(request, monkeypatch):
    """Tests marked ``reference`` check a mapping against PyTorch or float64 references: their float32 matmuls and
    convolutions run at full precision, in this process and in the commands they start. GPUs compute them in TF32
    (10-bit mantissas, ~1e-3 relative) and TPUs in bfloat16 passes by default, which would test the hardware, not
    the mapping; on CPUs the setting changes nothing."""
    if request.node.get_closest_marker("reference") is None:
        yield
        return
    monkeypatch.setenv("JAX_DEFAULT_MATMUL_PRECISION", "highest")
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory):
    """The reference run, through the same command (and so the same XLA flags) as the runs compared with it."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    run = deme(["pretrain", f"--config={CONFIG}", f"--workdir={workdir}"])
    out = run.communicate(timeout=600)[0]
    assert run.returncode == 0, out[-5000:]
    return workdir
