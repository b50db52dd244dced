"""How a training run fits the machine it has: a time budget (a GPU lent for minutes),
settings changed from the command line (``--set width=16``), and phantoms prepared once
for several methods (``ct-ai-node prepare``) so that their trainers can run side by side
from the cache instead of each generating the same phantoms.
"""

from __future__ import annotations

import dataclasses
import json
import time
import typing
from pathlib import Path
from typing import Callable, Sequence

from ct_ai_node.training.data import map_cases

#: METHOD arguments whose prepared phantoms are cached (``--cache-dir``)
CACHED_METHODS = ("dual-sampling", "resnext-lstm", "infection")


def out_of_time(budget_s: float | None, t0: float, epochs_done: int, now: float | None = None) -> bool:
    """True when one more epoch (as long as the mean so far) would end after ``budget_s``
    seconds from ``t0``; never with no budget."""
    if budget_s is None or epochs_done <= 0:
        return False
    elapsed = (time.time() if now is None else now) - t0
    return elapsed + elapsed / epochs_done > budget_s


def apply_overrides(settings, pairs: Sequence[str]):
    """``settings`` (a dataclass) with ``KEY=VALUE`` pairs applied. VALUE is read as
    JSON (numbers, true/false, null, lists) and else taken as text; a list becomes a
    tuple where the field holds one. Unknown keys and nested settings raise ValueError
    naming the key."""
    fields = {f.name: f for f in dataclasses.fields(settings)}
    hints = typing.get_type_hints(type(settings))
    changes = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE")
        if key not in fields:
            raise ValueError(f"--set {key}: no such setting for {type(settings).__name__}; "
                             f"one of: {', '.join(sorted(fields))}")
        if dataclasses.is_dataclass(getattr(settings, key)):
            raise ValueError(f"--set {key}: a group of settings, not one value")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        if isinstance(value, list) and "tuple" in str(hints.get(key, "")):
            value = tuple(value)
        if isinstance(getattr(settings, key), Path) and isinstance(value, str):
            value = Path(value)
        changes[key] = value
    return dataclasses.replace(settings, **changes)


def _writers(methods: Sequence[str], cache_dir: Path, shape) -> list[Callable]:
    """One function per method that writes a case's cache entry (if missing), through
    that method's own loader, so the entries are exactly the ones its trainer reads."""
    out = []
    for m in methods:
        if m == "dual-sampling":
            from ct_ai_node.training import train_c

            sc = train_c.TrainCSettings(cache_dir=Path(cache_dir), shape=shape, workers=1)
            out.append(lambda ref, sc=sc: train_c.load_cases([ref], sc))
        elif m == "resnext-lstm":
            from ct_ai_node.training import train_d

            sd = train_d.TrainDSettings(cache_dir=Path(cache_dir), shape=shape, workers=1)
            out.append(lambda ref, sd=sd: train_d.build_cache([ref], sd))
        elif m == "infection":
            from ct_ai_node.training import train_infection

            si = train_infection.InfectionTrainSettings(cache_dir=str(cache_dir), shape=shape, workers=1)
            out.append(lambda ref, si=si: train_infection.load_cases([ref], si))
        else:
            raise ValueError(f"--methods {m}: nothing to prepare; one of: {', '.join(CACHED_METHODS)}")
    return out


def _prepare_one(args) -> int:
    ref, methods, cache_dir, shape = args
    for write in _writers(methods, cache_dir, shape):
        write(ref)  # the phantom is made once: make_case keeps the last one
    return 1


def prepare_caches(methods: Sequence[str], refs: Sequence, cache_dir: Path, shape=None, workers: int | None = None,
                   progress: Callable[[], None] | None = None) -> int:
    """Generate every case of ``refs`` once and write each method's cache entry for it
    into ``cache_dir`` (entries already there are kept); returns the number of cases."""
    _writers(methods, cache_dir, shape)  # unknown method names fail before any work
    jobs = [(ref, tuple(methods), Path(cache_dir), shape) for ref in refs]
    return sum(map_cases(_prepare_one, jobs, workers, progress))
