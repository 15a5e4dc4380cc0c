"""Test set-up: 8 fake CPU devices so sharding is exercised without accelerators."""
import os

# Must happen before jax is imported anywhere in the test process.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Tests compile the same small programs in many processes (xdist workers, subprocess tests):
# share them through JAX's persistent compilation cache, kept in pytest's own (git-ignored)
# cache folder of this checkout rather than in a shared /tmp.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache",
                 "jax-compilation-cache"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# TensorFlow must never grab an accelerator in tests.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

# timm (through torchvision/triton) segfaults when it is imported after TensorFlow in the same
# process (torch 2.14 CUDA wheels + tensorflow 2.21, reproduced outside pytest). Test modules
# import TensorFlow through vitjax.data, so load timm first wherever it is installed.
try:
    import timm  # noqa: F401
except ImportError:
    pass

import shutil  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


# --- shared tiny models (tests/tiny.py defines them) ---------------------------------------------


@pytest.fixture(scope="session")
def tiny_vit():
    """(ViT, params, images) of tiny.TINY with perturbed parameters, built once per process."""
    from tiny import perturbed

    return perturbed()


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory):
    """A workdir where tiny.tiny_digits()'s pretrain stage has finished. Read-only: use
    `pretrained_copy`, which the runner accepts as the same finished stage for any config whose
    model, data and training keys are tiny_digits()'s."""
    from tiny import tiny_digits

    from vitjax.stages import runner

    path = tmp_path_factory.mktemp("tiny_pretrained") / "run"
    config = tiny_digits()
    config.stages = "pretrain"
    runner.run_pipeline(config, path)
    return path


@pytest.fixture
def pretrained_copy(tiny_pretrained, tmp_path):
    """A private copy of `tiny_pretrained` (tmp_path / 'run') to run later stages in."""
    return Path(shutil.copytree(tiny_pretrained, tmp_path / "run"))


# --- the command line in process ---------------------------------------------------------------


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli_in_process(monkeypatch, capfd):
    """`python -m vitjax.main ARGS` run in this process: (returncode, stdout, stderr).

    vitjax.main ends a failed run with os._exit (no interpreter teardown); here that raises
    SystemExit instead, and capfd captures what the command printed at the file-descriptor
    level (absl, TensorFlow and XLA's C++ logging included). The tests marked `subprocess` run
    the real process."""
    from absl import flags

    import vitjax.main as main_lib

    def exit_now(status):
        raise SystemExit(status)

    monkeypatch.setattr(main_lib.os, "_exit", exit_now)
    monkeypatch.chdir(REPO)

    def forget_the_last_command():
        # absl keeps the last values, and the --config.<field> flags that ml_collections
        # registered for the last command's overrides (registering them again is an error).
        for name in [n for n in flags.FLAGS if n.startswith("config.")]:
            delattr(flags.FLAGS, name)
        flags.FLAGS.unparse_flags()

    def run(*args) -> CliResult:
        argv = [sys.executable, *args]
        # ml_collections reads the --config.<field> overrides from sys.argv itself.
        monkeypatch.setattr(sys, "argv", argv)
        forget_the_last_command()
        capfd.readouterr()
        try:
            main_lib.main(main_lib._parse_flags(argv))
            status = 0
        except SystemExit as e:
            status = e.code
        finally:
            forget_the_last_command()
        out, err = capfd.readouterr()
        return CliResult(status, out, err)

    return run
