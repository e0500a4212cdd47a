"""platform.configure_xla: the CPU flags are added on CPU only, and a flag the user set
keeps the user's value."""

from cliquejax import platform


def flag_names(flags: str) -> set[str]:
    return {flag.split("=")[0] for flag in flags.split()}


def test_cpu_flags_are_added_on_cpu(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    flags = platform.configure_xla()
    wanted = flag_names(" ".join(platform.CPU_XLA_FLAGS)) | {"--xla_dump_to"}
    assert flag_names(flags) == wanted
    assert "--xla_cpu_use_fusion_emitters=false" in flags.split()


def test_no_cpu_flags_on_an_accelerator(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    monkeypatch.setenv("XLA_FLAGS", "")
    assert platform.configure_xla() == ""


def test_the_users_value_wins(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_fusion_emitters=true")
    flags = platform.configure_xla().split()
    assert "--xla_cpu_use_fusion_emitters=true" in flags
    assert "--xla_cpu_use_fusion_emitters=false" not in flags


def test_default_compilation_cache(monkeypatch):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "/somewhere")
    assert platform.default_compilation_cache() == "/somewhere/cliquejax/jax"
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/mine")
    assert platform.default_compilation_cache() == "/mine"
