"""Optional C++ kernels for the worker's CPU hot path, compiled on first use.

`paged_decode()` is the decode-attention kernel of ``csrc/paged_decode.cpp`` (it reads K/V
straight from the paged pool through the block tables, no gather copy); `fused_ops()` the
decoder layer's elementwise glue of ``csrc/fused_ops.cpp`` (residual add + RMSNorm, SiLU * up,
rotary embedding). Each is None where it cannot be had: ``ECOSERVE_KERNELS=0`` in the
environment, no compiler or ninja, or any build error (logged once as a warning). Callers then
use the pure-torch path, which stays the reference.

The sources are built with ``torch.utils.cpp_extension.load`` (-O3 -march=native) into torch's
extension cache (``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``). That cache
is keyed by the extension's name, so the name carries a hash of the CPU's model and flags, the
compiler flags and the torch version: another machine sharing the directory builds its own.
The first build takes tens of seconds; later processes load the cached library.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch

from .cpuinfo import cpu_flags, cpu_model

log = logging.getLogger(__name__)

ENV = "ECOSERVE_KERNELS"
CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = [CSRC / "paged_decode.cpp", CSRC / "fused_ops.cpp"]  # one library; include *.h
CFLAGS = ["-O3", "-march=native"]


def enabled() -> bool:
    """False when the environment switches the kernels off (ECOSERVE_KERNELS=0/false/off)."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def cpu_tag() -> str:
    """A short hash of what a -march=native build depends on: CPU model and flags, compiler
    flags, torch version, and the sources (torch's own rebuild check sees only the .cpp, not
    the header it includes)."""
    info = [platform.machine(), torch.__version__, *CFLAGS, cpu_model(), *sorted(cpu_flags())]
    info += [hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(CSRC.glob("*.[ch]*"))]
    return hashlib.sha256("\n".join(info).encode()).hexdigest()[:12]


@cache
def _load() -> object | None:
    """torch.ops.ecoserve once the library is built or loaded, else None."""
    if not enabled():
        log.info("%s=0: C++ kernels disabled, using the torch path", ENV)
        return None
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return _unavailable(f"no compiler {cxx!r}")
    t0 = time.perf_counter()
    try:
        from torch.utils import cpp_extension

        cpp_extension.load(
            name=f"ecoserve_kernels_{cpu_tag()}",
            sources=[str(src) for src in SOURCES],
            extra_cflags=CFLAGS,
            is_python_module=False,
            verbose=False,
        )
        ops = torch.ops.ecoserve
        for name in ("paged_decode", "add_rms_norm", "silu_mul", "rope_"):
            getattr(ops, name)  # raises if the library lacks one
    except Exception as e:  # any failure: no kernel, the torch path
        return _unavailable(_brief(e))
    log.info("C++ kernels ready in %.1f s", time.perf_counter() - t0)
    return ops


def _unavailable(reason: str) -> None:
    log.warning("C++ kernels unavailable (%s); using the torch path", reason)


def _brief(e: Exception) -> str:
    """One line of a build failure: the compiler's first error where there is one."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()] or [type(e).__name__]
    head = lines[0].split(":")[0] if len(lines[0]) > 120 else lines[0]
    err = next((x for x in lines[1:] if "error" in x.lower()), None)
    return (f"{head}: {err}" if err else head)[:300]


def paged_decode() -> Callable[..., torch.Tensor] | None:
    """The op ``(q [B, H, D], pool [2, KVH, NB, BS, D], tables [B, W] int, lens [B] int,
    window: int (<= 0: none), scale: float) -> [B, H * D]``, or None (see the module doc).
    Built or loaded once per process."""
    ops = _load()
    return None if ops is None else ops.paged_decode


def fused_ops() -> object | None:
    """torch.ops.ecoserve with ``add_rms_norm(x, delta|None, weight, eps) -> y`` (x += delta in
    place, y = weight * rms_norm(x)), ``silu_mul(gate_up [T, 2I]) -> [T, I]`` and
    ``rope_(qk [T, H, D], cos, sin)`` (in place), or None (see the module doc)."""
    return _load()


def main() -> int:
    """`python -m ecoserve_worker.kernels`: build (or load) the kernels now, so a worker's first
    start does not spend ~10 s compiling them (`make model` runs this). Exit code 0 either way:
    without them the worker runs the torch path."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ops = _load()
    print("C++ kernels:", "ready" if ops is not None else "unavailable (torch path)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
