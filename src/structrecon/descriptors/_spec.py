"""Frozen, validated specifications of fingerprints, with dict/TOML forms."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any, ClassVar

from .._errors import StructreconError

__all__ = ["FingerprintSpec", "POOLINGS", "register_descriptor", "descriptor_kinds"]

#: pooling kinds over the atoms of a structure (see :mod:`structrecon.descriptors.pooling`)
POOLINGS = ("maxmin", "sum-species", "mean", "sum", "none")

_DESCRIPTORS: dict[str, type] = {}


def register_descriptor(cls):
    """Class decorator: make a descriptor spec class known under ``cls.kind``."""
    _DESCRIPTORS[cls.kind] = cls
    return cls


def descriptor_kinds() -> list[str]:
    """Names of the registered descriptor kinds."""
    return sorted(_DESCRIPTORS)


def check_keys(what: str, given, valid) -> None:
    """Raise a one-line error naming the valid keys if ``given`` has unknown ones."""
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise StructreconError(
            f"unknown {what} option(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}"
        )


def spec_from_fields(cls, data: dict[str, Any]):
    """Build a frozen spec dataclass from a plain dict, rejecting unknown keys."""
    fields = {f.name for f in dataclasses.fields(cls)}
    check_keys(f"'{cls.kind}' descriptor", data, fields)
    try:
        return cls(**data)
    except TypeError as err:  # missing required fields
        raise StructreconError(f"'{cls.kind}' descriptor: {err}") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class FingerprintSpec:
    """A per-atom descriptor followed by a pooling over atoms: one vector per structure.

    Parameters
    ----------
    descriptor : a registered descriptor spec (e.g. :class:`ACSFSpec`).
    pooling : one of :data:`POOLINGS`.  ``maxmin`` is Fung 2022 eq. 3, ``sum-species``
        Cobelli 2022 eq. 2; ``none`` is for global descriptors (one row per structure,
        e.g. MILAD moment invariants), whose ``build`` returns [B, 1, F].
    name : preset name, for display only.
    """

    descriptor: Any
    pooling: str = "maxmin"
    name: str = ""

    kind: ClassVar[str] = "fingerprint"

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise StructreconError(
                f"unknown pooling '{self.pooling}'; valid: {', '.join(POOLINGS)}"
            )
        if type(self.descriptor).kind not in _DESCRIPTORS:
            raise StructreconError(f"unknown descriptor {self.descriptor!r}")

    @property
    def species(self) -> tuple[int, ...]:
        """Atomic numbers the descriptor resolves, sorted."""
        return self.descriptor.species

    @property
    def n_features(self) -> int:
        """Length of the pooled fingerprint."""
        per_atom = self.descriptor.n_features
        if self.pooling == "maxmin":
            return 2 * per_atom
        if self.pooling == "sum-species":
            return len(self.species) * per_atom
        return per_atom  # mean, sum, and none (a global descriptor)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON/TOML-able) that :meth:`from_dict` reads back."""
        desc = {"kind": type(self.descriptor).kind}
        desc.update(self.descriptor.to_dict())
        out = {"pooling": self.pooling, "descriptor": desc}
        if self.name:
            out["name"] = self.name
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FingerprintSpec:
        """Inverse of :meth:`to_dict`; unknown keys are errors naming the valid ones."""
        if not isinstance(data, dict) or "descriptor" not in data:
            raise StructreconError("a fingerprint spec needs a [descriptor] table")
        check_keys("fingerprint spec", data, ["descriptor", "pooling", "name"])
        desc = dict(data["descriptor"])
        kind = desc.pop("kind", None)
        if kind not in _DESCRIPTORS:
            raise StructreconError(
                f"unknown descriptor kind '{kind}'; valid: {', '.join(descriptor_kinds())}"
            )
        descriptor = _DESCRIPTORS[kind].from_dict(desc)
        return cls(
            descriptor=descriptor,
            pooling=data.get("pooling", "maxmin"),
            name=data.get("name", ""),
        )

    def to_json(self) -> str:
        """Compact JSON form, as stored in fingerprint files."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FingerprintSpec:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))

    def to_toml(self) -> str:
        """TOML form that ``structrecon describe -d FILE.toml`` reads."""
        data = self.to_dict()
        lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if k != "descriptor"]
        lines.append("")
        lines.append("[descriptor]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in data["descriptor"].items()]
        return "\n".join(lines) + "\n"

    @classmethod
    def from_toml(cls, path: str | Path) -> FingerprintSpec:
        """Read a spec from a TOML file."""
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as err:
            raise StructreconError(f"cannot read spec file {path}: {err.strerror}") from None
        except tomllib.TOMLDecodeError as err:
            raise StructreconError(f"spec file {path} is not valid TOML: {err}") from None
        return cls.from_dict(data)


def _toml_value(value) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)
