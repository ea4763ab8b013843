"""C++ kernels for the CPU engine, compiled on first use: paged decode attention, the
float32 element-wise parts of a decoder layer fused (RMSNorm, SiLU-and-multiply, RoPE), the
write of new keys/values into an 8-bit cache, the int8 linear, and the float32 linear of a few
rows (sources in csrc/).

Pure-PyTorch paged attention must first gather every sequence's blocks into one contiguous
tensor and then read it again; at decode time, on CPU, that copy costs more than the
attention itself. This kernel reads each key and value row once, straight from its block,
with a numerically stable softmax, one sequence per task across threads. The cache may be
float32, bfloat16 or float16, or packed 8-bit rows (fp8 e4m3 or int8 with E8M0 scales, see
kv_quant.py), read as is and computed in float32; with AVX2 and head sizes 32/64/128 it runs
vectorized, otherwise a portable scalar loop.

The fused element-wise ops save the round trips through memory and the per-op dispatch of
the PyTorch formulas (at a 1024-token prefill step, SiLU-and-multiply alone took 1.8 ms as
two ops and takes 0.2 ms fused).

They are built with torch's JIT extension loader (needs a C++ compiler and ninja) and cached
by torch under ~/.cache/torch_extensions (or $TORCH_EXTENSIONS_DIR), under a name that carries
a hash of the source, so two versions never share a build. When they cannot be built, `load()` returns None and
the engine keeps the pure-PyTorch path, which gives the same results.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# C++ sources, compiled as one translation unit in this order (attention.cpp holds the includes
# and the vector helpers the others use).
_CSRC = ("attention.cpp", "fused.cpp", "quant.cpp", "linear.cpp")
_FUNCTIONS = ["paged_decode_attention", "write_kv_packed", "rms_norm", "silu_and_mul", "rope_", "int8_linear",
              "small_linear", "small_linear_width"]


def _source() -> str:
    root = os.path.join(os.path.dirname(__file__), "csrc")
    return "\n".join(open(os.path.join(root, name), encoding="utf-8").read() for name in _CSRC)


def _name(source: str) -> str:
    # named for its source: two versions of the kernels never share a build directory
    return f"tandem_cpu_kernels_{hashlib.sha256(source.encode()).hexdigest()[:12]}"


def _built() -> bool:
    """Whether the compiled module of the current source is in torch's extension cache."""
    name = _name(_source())
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return (Path(_get_build_directory(name, False)) / f"{name}.so").is_file()
    except Exception:  # noqa: BLE001 - a private helper; without it, say nothing
        return True


def _open_anywhere(path: Path) -> bool:
    """Whether any process (of those this one may inspect, in /proc) has `path` open."""
    target = os.path.realpath(path)
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) == target for fd in fd_dir.iterdir()):
                return True
        except OSError:  # gone, or not ours to read
            continue
    return False


@contextlib.contextmanager
def _exclusive_build(build_dir: Path):
    """Serialises builds and loads across processes with a lock the kernel drops when its holder
    dies. torch's own lock (`lock` in the build directory) is a plain file, kept open while its
    creator builds: a process killed while compiling leaves it behind, and every later start
    would wait for it forever. Under this lock, one that no process has open is such a leftover,
    and is removed."""
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / "tandem.flock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            leftover = build_dir / "lock"
            if leftover.exists() and not _open_anywhere(leftover):
                log.warning("removing %s, left by an interrupted build of the CPU kernels", leftover)
                leftover.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@functools.cache
def load():
    """The compiled module, or None when it cannot be built here (then callers use torch ops)."""
    # ninja comes with Tandem's Python dependencies; make it findable when the environment's
    # bin directory is not on PATH (e.g. `.venv/bin/python -m ...` without activating it)
    bindir = os.path.dirname(sys.executable)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    start = time.monotonic()
    try:
        from torch.utils.cpp_extension import _get_build_directory, load_inline

        source = _source()
        name = _name(source)
        if not _built():
            log.info("compiling the CPU kernels (first start only: about a minute; cached afterwards)")
        with _exclusive_build(Path(_get_build_directory(name, False))):
            module = load_inline(
                name=name,
                cpp_sources=[source],
                functions=_FUNCTIONS,
                extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp-simd"],
                verbose=False,
            )
        if time.monotonic() - start > 5:
            log.info("CPU kernels ready after %.0f s", time.monotonic() - start)
        return module
    except Exception as e:  # noqa: BLE001 - any build failure means "use the fallback"
        log.warning("CPU kernels unavailable (%s); using the PyTorch path", e)
        return None


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float, window: int | None) -> torch.Tensor:
    """q: [B, Hq, D] -> [B, Hq, D] in q's dtype; the caller checked `usable`. The caches keep their
    dtype (bfloat16 halves the bytes read); arithmetic is float32."""
    out = load().paged_decode_attention(q.float().contiguous(), k_cache, v_cache, block_tables, context_lens,
                                        scale, window or 0)
    return out.to(q.dtype)


KV_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether decode attention runs here for tensors of this device and dtype."""
    return device.type == "cpu" and dtype in KV_DTYPES and load() is not None


def usable(q: torch.Tensor) -> bool:
    return supports(q.device, q.dtype)


def fused_ok(x: torch.Tensor) -> bool:
    """Whether the fused float32 element-wise ops (rms_norm, silu_and_mul, rope_) apply to x.
    Half precision keeps the PyTorch ops, whose rounding steps match HF's."""
    return x.dtype == torch.float32 and supports(x.device, x.dtype)


SMALL_LINEAR_MAX_ROWS = 8  # csrc/linear.cpp


@functools.cache
def small_linear_width() -> int:
    """K must be a multiple of this for `small_linear`; 0: the kernel is not available here."""
    module = load()
    return module.small_linear_width() if module is not None else 0


def small_linear_ok(weight: torch.Tensor) -> bool:
    """Whether `small_linear` can take this weight (contiguous float32 on CPU, K a multiple of the
    vector width, kernels built); x must then pass `small_rows`."""
    width = small_linear_width() if weight.device.type == "cpu" else 0
    return (width > 0 and weight.dtype == torch.float32 and weight.dim() == 2 and weight.shape[1] % width == 0
            and weight.is_contiguous())


def small_rows(x: torch.Tensor) -> bool:
    """Whether x is what `small_linear` multiplies: [M <= SMALL_LINEAR_MAX_ROWS, K] float32."""
    return x.dim() == 2 and x.shape[0] <= SMALL_LINEAR_MAX_ROWS and x.dtype == torch.float32


_NO_BIAS = torch.empty(0)


def small_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] @ weight.T + bias for M <= SMALL_LINEAR_MAX_ROWS (the caller checked
    `small_linear_ok(weight)`): each row's result is the same whatever M is."""
    return load().small_linear(x.contiguous(), weight, _NO_BIAS if bias is None else bias)
