"""Nsight Compute's raw CSV of `gpu__time_duration.sum` (--csv --page raw), shared by the GPU scripts.

read(path): the kernels in launch order as (name, microseconds), and the unit row's text.
by_name(kernels, width): (name cut at its argument list and at `width` characters, calls, total us),
the largest total first.
"""
import collections
import csv
import re

_SCALE = {"n": 1e-3, "u": 1.0, "m": 1e3}  # the unit row's first letter: nsecond, usecond, msecond


def read(path):
    rows = list(csv.reader(line for line in open(path, errors="replace") if line.startswith('"')))
    head = rows[0]
    name_i, dur_i = head.index("Kernel Name"), head.index("gpu__time_duration.sum")
    unit = rows[1][dur_i] if len(rows) > 1 else ""
    scale = _SCALE.get(unit[:1], 1e-3)
    kernels = []
    for x in rows[1:]:
        try:
            kernels.append((x[name_i], float(x[dur_i].replace(",", "")) * scale))  # thousands separators
        except (ValueError, IndexError):
            pass  # the unit row
    return kernels, unit


def by_name(kernels, width):
    groups = collections.defaultdict(lambda: [0, 0.0])
    for name, us in kernels:
        g = groups[re.sub(r"\(.*", "", name)[:width]]
        g[0] += 1
        g[1] += us
    return sorted(((n, c, t) for n, (c, t) in groups.items()), key=lambda x: -x[2])
