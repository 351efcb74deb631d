"""Reading files at the edge of the library, with one-line errors."""

from __future__ import annotations

from pathlib import Path

from ._errors import StructreconError


def check_file(path, what: str = "input") -> Path:
    """The path of an existing, non-empty regular file; else a one-line error."""
    p = Path(path)
    if not p.exists():
        raise StructreconError(f"{what} file {path} does not exist")
    if p.is_dir():
        raise StructreconError(f"{what} {path} is a directory, not a file")
    if p.stat().st_size == 0:
        raise StructreconError(f"{what} file {path} is empty")
    return p


def read_frames(path: str, what: str = "input"):
    """All frames of a file ASE reads; errors name the file and the problem."""
    import ase.io

    check_file(path, what)
    try:
        frames = ase.io.read(path, index=":")
    except Exception as err:  # ASE raises many kinds
        raise StructreconError(f"cannot read {what} file {path}: {err}") from None
    if not isinstance(frames, list):
        frames = [frames]
    if not frames:
        raise StructreconError(f"{what} file {path} holds no structures")
    for k, atoms in enumerate(frames):
        if len(atoms) == 0:
            raise StructreconError(f"{what} file {path}: frame {k} has no atoms")
    return frames


def frame_name(atoms, path: str, k: int) -> str:
    """The frame's ``name`` info key, else FILESTEM_INDEX."""
    name = atoms.info.get("name")
    return str(name) if name not in (None, "") else f"{Path(path).stem}_{k}"
