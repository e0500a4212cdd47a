"""cliquejax.platform without the CPU package's part (tests/cpu/test_platform.py): no XLA:CPU
flags on an accelerator, and where the compilation cache lives."""

from cliquejax import platform


def test_no_cpu_flags_on_an_accelerator(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    monkeypatch.setenv("XLA_FLAGS", "")
    assert platform.configure_xla() == ""


def test_default_compilation_cache(monkeypatch):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "/somewhere")
    assert platform.default_compilation_cache() == "/somewhere/cliquejax/jax"
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/mine")
    assert platform.default_compilation_cache() == "/mine"
