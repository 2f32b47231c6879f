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

import pytest  # noqa: E402

from tests.runs import CONFIG, deme  # noqa: E402


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory):
    """The reference run, through the same command (and so the same XLA flags) as the runs compared with it."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    run = deme(["pretrain", f"--config={CONFIG}", f"--workdir={workdir}"])
    out = run.communicate(timeout=600)[0]
    assert run.returncode == 0, out[-5000:]
    return workdir
