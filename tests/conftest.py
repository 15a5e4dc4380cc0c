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
