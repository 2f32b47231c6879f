"""The XLA:CPU flag is added only when jaxlib knows it, after the user's own flags."""

import os
import subprocess
import sys

from deme_jax.xla_cpu import FLAG, jaxlib_knows


def run_fresh(env_flags: str) -> str:
    script = ("import os; from deme_jax.xla_cpu import use_all_cores_for_convolutions as f; "
              "print(f()); print(os.environ.get('XLA_FLAGS', '')); import jax, jax.numpy as jnp; "
              "print(float(jnp.ones(3).sum()))")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if env_flags:
        env["XLA_FLAGS"] = env_flags
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.splitlines()


def test_flag_is_appended_to_the_users_flags_and_jax_accepts_it():
    assert jaxlib_knows(FLAG)
    set_, flags, result = run_fresh("--xla_cpu_enable_fast_math=false")
    assert set_ == "True" and result == "3.0"
    assert flags.startswith("--xla_cpu_enable_fast_math=false ") and FLAG in flags


def test_unknown_flags_are_not_known():
    assert not jaxlib_knows("--xla_no_such_flag_in_any_jaxlib")
