"""Shared fixtures. float64 is opt-in: a test asks for the `x64` fixture (or uses
`jax.enable_x64(True)` as a context manager inside its body); every other test runs in JAX's
default float32 mode, which `_x64_off_unless_asked` checks before and after each test, so the
float32 path is exercised in-process and no test leaks x64 into the next."""

import jax
import pytest


@pytest.fixture
def x64():
  """Runs the test with jax_enable_x64 on (restored afterwards)."""
  with jax.enable_x64(True):
    yield


@pytest.fixture(autouse=True)
def _x64_off_unless_asked(request):
  asked = "x64" in request.fixturenames
  if not asked:
    assert not jax.config.jax_enable_x64, (
        f"{request.node.nodeid}: x64 is on although the test did not ask for it "
        "(an earlier import or test enabled it process-wide)")
  yield
  if not asked:
    assert not jax.config.jax_enable_x64, (
        f"{request.node.nodeid} left jax_enable_x64 on; use the x64 fixture or "
        "`with jax.enable_x64(True):` instead of jax.config.update")
