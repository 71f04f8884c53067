"""Peak CPU memory of one call, for the bench scripts: the kernel's resident-set high-water mark.

Run the measured call in a child process started with ``MALLOC_MMAP_THRESHOLD_=65536`` (large
blocks are mmapped and returned on free, so the resident set follows live memory);
`peak_rss_mb(fn)` resets VmHWM (/proc/self/clear_refs) and reports VmHWM minus VmRSS at the start.
"""

from __future__ import annotations

CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_rss_mb(fn) -> float:
    """Peak resident set during fn() above the level at its start (kernel high-water mark)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current VmRSS
    start = status_kb("VmRSS")
    fn()
    return (status_kb("VmHWM") - start) / 1024
