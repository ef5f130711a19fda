"""Launch-configuration tables: ``rocmoe/configs/<op>/<arch>.json``.

A kernel that has launch parameters declares a :class:`ConfigSpec`: the
parameter dataclass (block sizes, warps, stages, split counts, AMD
``waves_per_eu`` ...), the shape-regime keys a table is indexed by (e.g.
``tokens_per_expert``) and one heuristic per device family. At launch,
:meth:`ConfigSpec.choose` takes the first table entry whose bounds contain the
live regime; with no table for the arch (or no matching entry) it falls back
to the family's heuristic. Tables are looked up first in ``ROCMOE_CONFIG_DIR``
(read once at import; for a user's own tuned tables), then in the package.

Table format::

    {
      "schema_version": 1,
      "op": "gemma4_routing",
      "arch": "sm90",
      "provenance": {"source": "measured" | "heuristic", "device": "...",
                     "date": "...", "command": "...", "versions": {...}},
      "keys": ["tokens"],
      "entries": [
        {"when": {"tokens": [1, 128]},   "config": {"BLOCK_T": 1, "num_warps": 1}},
        {"when": {"tokens": [129, null]}, "config": {"BLOCK_T": 8, "num_warps": 4}}
      ]
    }

``when`` bounds are inclusive; ``null`` is unbounded; a key left out matches
anything. A malformed table raises :class:`ConfigTableError` naming the file
and the offending key.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rocmoe.device import Device

__all__ = [
    "SCHEMA_VERSION",
    "ConfigSpec",
    "ConfigTable",
    "ConfigTableError",
    "load_table",
    "find_table",
    "register_spec",
    "specs",
]

SCHEMA_VERSION = 1
PACKAGE_DIR = Path(__file__).resolve().parent
_USER_DIR = os.environ.get("ROCMOE_CONFIG_DIR", "").strip() or None


class ConfigTableError(ValueError):
    """A config table that does not follow the schema."""

    def __init__(self, path: Path | str, key: str, problem: str):
        self.path, self.key = str(path), key
        super().__init__(f"{path}: {key}: {problem}")


@dataclass(frozen=True)
class ConfigTable:
    """A validated table. ``entries`` is a tuple of (bounds, params) with
    bounds a mapping key -> (lo, hi or None)."""

    op: str
    arch: str
    path: str
    provenance: Mapping[str, Any]
    keys: tuple[str, ...]
    entries: tuple[tuple[Mapping[str, tuple[int, int | None]], Any], ...]

    def lookup(self, regime: Mapping[str, int]) -> Any | None:
        """The params of the first entry whose bounds hold ``regime``, else None."""
        for bounds, params in self.entries:
            if all(lo <= regime[k] and (hi is None or regime[k] <= hi) for k, (lo, hi) in bounds.items()):
                return params
        return None

    @property
    def source(self) -> str:
        return str(self.provenance.get("source", "unknown"))

    def describe(self) -> str:
        extra = ", ".join(str(self.provenance[k]) for k in ("device", "date") if self.provenance.get(k))
        return f"table {self.path} ({self.source}{', ' + extra if extra else ''})"


@dataclass
class ConfigSpec:
    """What a kernel's launch configuration is made of and where it comes from.

    Args:
        op: the op name (the table folder).
        kernel: a name for the kernel family inside the op (for messages).
        params: a dataclass type whose fields are the launch parameters (int).
        regime_keys: the shape facts tables are keyed by.
        heuristics: device family -> function(regime) -> params instance; the
            ``"default"`` entry serves families without their own.
    """

    op: str
    kernel: str
    params: type
    regime_keys: tuple[str, ...]
    heuristics: Mapping[str, Callable[[Mapping[str, int]], Any]]
    _tables: dict[str, ConfigTable | None] = field(default_factory=dict, repr=False)
    _chosen: dict[tuple, tuple[Any, str]] = field(default_factory=dict, repr=False)

    def table(self, arch: str) -> ConfigTable | None:
        """The table for ``arch`` (loaded and validated once), or None."""
        if arch not in self._tables:
            path = find_table(self.op, arch)
            self._tables[arch] = None if path is None else load_table(path, self)
        return self._tables[arch]

    def heuristic(self, device: Device) -> Callable[[Mapping[str, int]], Any]:
        fn = self.heuristics.get(device.family) or self.heuristics.get("default")
        if fn is None:
            raise LookupError(f"{self.op}/{self.kernel} has no launch heuristic for {device.family}")
        return fn

    def choose(self, device: Device, **regime: int) -> tuple[Any, str]:
        """(params, where they came from) for the live ``regime`` on ``device``
        (memoised: the launch path is one dict lookup after the first call)."""
        key = (device.arch, device.family, *sorted(regime.items()))
        hit = self._chosen.get(key)
        if hit is None:
            hit = self._chosen[key] = self._choose(device, regime)
        return hit

    def forget(self) -> None:
        """Drop loaded tables and memoised choices (after a table was rewritten)."""
        self._tables.clear()
        self._chosen.clear()

    def _choose(self, device: Device, regime: dict[str, int]) -> tuple[Any, str]:
        missing = set(self.regime_keys) - set(regime)
        if missing:
            raise TypeError(f"{self.op}/{self.kernel}: regime is missing {', '.join(sorted(missing))}")
        table = self.table(device.arch)
        if table is not None:
            params = table.lookup(regime)
            if params is not None:
                return params, table.describe()
        return self.heuristic(device)(regime), f"heuristic for {device.family}"

    def source(self, device: Device) -> str:
        """Where launch configs for ``device`` come from, for ``rocmoe info``."""
        table = self.table(device.arch)
        return table.describe() if table is not None else f"heuristic for {device.family}"


_specs: dict[tuple[str, str], ConfigSpec] = {}


def register_spec(spec: ConfigSpec) -> ConfigSpec:
    """Make ``spec`` known to ``rocmoe info`` and the table tools; returns it."""
    _specs[(spec.op, spec.kernel)] = spec
    return spec


def specs() -> list[ConfigSpec]:
    """Every registered spec (those of the backends imported so far)."""
    return list(_specs.values())


def find_table(op: str, arch: str) -> Path | None:
    """The table file for (op, arch): the user's directory first, then the package's."""
    for root in (_USER_DIR, PACKAGE_DIR):
        if root is None:
            continue
        path = Path(root) / op / f"{arch}.json"
        if path.is_file():
            return path
    return None


def _check_bound(path: Path, where: str, value: Any) -> tuple[int, int | None]:
    if (not isinstance(value, list) or len(value) != 2 or not _is_int(value[0])
            or not (value[1] is None or _is_int(value[1]))):
        raise ConfigTableError(path, where, f"expected [lo, hi] with int lo and int-or-null hi, got {value!r}")
    lo, hi = value
    if hi is not None and hi < lo:
        raise ConfigTableError(path, where, f"empty range {value!r} (hi < lo)")
    return lo, hi


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_table(path: Path | str, spec: ConfigSpec) -> ConfigTable:
    """Read and validate one table against ``spec``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigTableError(path, "<file>", f"cannot read JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigTableError(path, "<root>", "expected a JSON object")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ConfigTableError(path, "schema_version", f"expected {SCHEMA_VERSION}, got {data.get('schema_version')!r}")
    if data.get("op") != spec.op:
        raise ConfigTableError(path, "op", f"expected {spec.op!r}, got {data.get('op')!r}")
    arch = data.get("arch")
    if not isinstance(arch, str) or (path.stem != arch):
        raise ConfigTableError(path, "arch", f"expected the file's arch {path.stem!r}, got {arch!r}")
    provenance = data.get("provenance")
    if not isinstance(provenance, dict) or provenance.get("source") not in ("measured", "heuristic"):
        raise ConfigTableError(path, "provenance.source", "expected 'measured' or 'heuristic'")
    keys = data.get("keys")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ConfigTableError(path, "keys", f"expected a list of names, got {keys!r}")
    unknown = [k for k in keys if k not in spec.regime_keys]
    if unknown:
        raise ConfigTableError(path, "keys", f"unknown regime key(s) {unknown}; valid: {list(spec.regime_keys)}")
    entries = data.get("entries")
    if not isinstance(entries, list) or not entries:
        raise ConfigTableError(path, "entries", "expected a non-empty list")
    fields = {f.name: f for f in dataclasses.fields(spec.params)}
    required = {n for n, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    parsed = []
    for i, entry in enumerate(entries):
        where = f"entries[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"when", "config"}:
            raise ConfigTableError(path, where, "expected an object with exactly 'when' and 'config'")
        when, config = entry["when"], entry["config"]
        if not isinstance(when, dict):
            raise ConfigTableError(path, f"{where}.when", "expected an object")
        bounds = {}
        for key, value in when.items():
            if key not in keys:
                raise ConfigTableError(path, f"{where}.when.{key}", f"not one of the table's keys {keys}")
            bounds[key] = _check_bound(path, f"{where}.when.{key}", value)
        if not isinstance(config, dict):
            raise ConfigTableError(path, f"{where}.config", "expected an object")
        for name, value in config.items():
            if name not in fields:
                raise ConfigTableError(path, f"{where}.config.{name}",
                                       f"unknown parameter; valid: {', '.join(fields)}")
            if fields[name].type in (bool, "bool"):
                if not isinstance(value, bool):
                    raise ConfigTableError(path, f"{where}.config.{name}", f"expected true or false, got {value!r}")
            elif not _is_int(value):
                raise ConfigTableError(path, f"{where}.config.{name}", f"expected an int, got {value!r}")
        absent = required - set(config)
        if absent:
            raise ConfigTableError(path, f"{where}.config", f"missing parameter(s) {sorted(absent)}")
        parsed.append((bounds, spec.params(**config)))
    return ConfigTable(spec.op, arch, str(path), dict(provenance), tuple(keys), tuple(parsed))
