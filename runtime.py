"""Process-wide set-up a script turns on in its ``main``: logging, seeds, threads, the device, the
CPU's float mode and glibc's allocator thresholds; and the progress bars and peak-memory readings
the libraries use. Importing does nothing: each script's ``main`` calls these itself, visibly.
"""
from __future__ import annotations

import logging
import random
import sys

import numpy as np
import torch
from tqdm.auto import tqdm

log = logging.getLogger("scpretrain")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DEVICES = ("auto", "cpu", "cuda")


def set_up_process(log_level: str = "INFO", seed: int = 0) -> None:
    """What every script's ``main`` turns on for its whole process, in one visible call: logging at
    ``log_level``, the global generators seeded, subnormal floats flushed to zero on the CPU, and
    glibc's allocator returning freed blocks (see each function)."""
    setup_logging(log_level)
    seed_everything(seed)
    flush_denormals()
    return_freed_memory()


def setup_logging(level: str = "INFO") -> None:
    """Log to stderr at ``level``: this project's records (``scpretrain.*``) from ``level`` up, other
    libraries' from WARNING up whatever ``level`` is (at DEBUG, numba's compiler alone wrote
    thousands of lines of its internals into a pre-training log)."""
    level = str(level).upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"unknown log level '{level}'; choose one of {', '.join(LOG_LEVELS)}")
    logging.basicConfig(level=getattr(logging, level), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_others_from_warning)


def _others_from_warning(record: logging.LogRecord) -> bool:
    """Whether a record is written: every record of this project's loggers, others' from WARNING."""
    return record.name == log.name or record.name.startswith(log.name + ".") or record.levelno >= logging.WARNING


def seed_everything(seed: int) -> None:
    """Python's, numpy's legacy and torch's global generators (the code draws from its own seeded
    generators; this covers libraries that draw from the global ones)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(wanted: str = "auto") -> torch.device:
    """cpu/cuda; asking for cuda without a GPU warns and uses the CPU. Scripts call this once per
    run, so the warning is said once."""
    if wanted not in DEVICES:
        raise ValueError(f"unknown device '{wanted}'; choose one of {', '.join(DEVICES)}")
    if wanted == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if wanted == "cuda" and not torch.cuda.is_available():
        log.warning("--cuda/--device cuda asked for, but no CUDA GPU is available: running on the CPU")
        return torch.device("cpu")
    return torch.device(wanted)


def set_threads(threads: int) -> None:
    """torch's intra-op threads (the CPU's sparse kernels follow them); 0 leaves torch's default."""
    if threads:
        torch.set_num_threads(int(threads))


def flush_denormals() -> None:
    """Treat subnormal floats as zero on the CPU, before any thread pool starts (threads inherit it).

    Saturated sigmoids make gradients subnormal (below 1.2e-38), and x86 arithmetic on those is
    many times slower; values that small change no weight of float32 magnitude, so results stay
    the same (figures in bench/README.md).
    """
    torch.set_flush_denormal(True)


def return_freed_memory(threshold: int = 1 << 20) -> bool:
    """glibc only: allocate blocks of ``threshold`` bytes and more with mmap, so that freeing one
    returns it to the system at once. Datasets are read whole and freed one by one as they are
    aligned; with glibc's default (a threshold that grows up to 32 MB as blocks are freed) about
    half of the freed memory stayed with the process and raised phase 1's peak (figures in
    bench/README.md). For reading: computing under it is slow (``reuse_freed_memory``). False
    (and nothing done) where there is no glibc."""
    return set_malloc_thresholds(mmap=threshold)


def reuse_freed_memory(threshold: int = 256 << 20) -> bool:
    """glibc only: from here on, let the process keep and reuse freed blocks below ``threshold``
    bytes (and up to twice that free at the top of its heap). Pre-training steps allocate and free
    the same tens of megabytes per dataset head again and again; under the reading threshold each
    came fresh from the system and was faulted in page by page. On the whole-collection benchmark
    (bench/README.md) a step took 1.57 s under 256 MiB and 1.96 s under 16 MiB (peaks 7,976 and
    7,691 MiB), and 2.4-3.9 s over its first steps under 1 MiB. False (and nothing done) where
    there is no glibc."""
    return set_malloc_thresholds(mmap=threshold, trim=2 * threshold)


def set_malloc_thresholds(mmap: int, trim: int | None = None) -> bool:
    libc = _libc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(-3, int(mmap)))  # -3: M_MMAP_THRESHOLD
    return ok and (trim is None or bool(libc.mallopt(-1, int(trim))))  # -1: M_TRIM_THRESHOLD


def _libc():
    """glibc, or None where there is none (mallopt is glibc's)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt  # noqa: B018 (must exist)
        return libc
    except (OSError, AttributeError):
        return None


def progress(iterable=None, disable: bool = False, **kwargs):
    """A tqdm bar on a terminal only: on a log file, CI or nohup (stderr not a TTY) no bar frames
    are written, only the log lines."""
    return tqdm(iterable, disable=True if disable else None, **kwargs)


def peak_memory_mib() -> float | None:
    """This process's peak resident memory so far in MiB (None where the OS does not say)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def mib(value: float | None) -> str:
    return "unknown" if value is None else f"{value:,.0f}"
