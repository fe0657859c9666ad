"""Crash-safe file output, and never touching what textok did not write.

* A directory is written beside its target, fsynced, then renamed into place; a file is written to a
  temporary name and renamed. A reader never sees a half-written checkpoint, model or image: either the old
  one or the complete new one.
* An existing target is replaced only when it is a textok artefact (it holds one of the marker files textok
  writes, or nothing at all); anything else is refused in one line naming the path.
* Temporary (``.NAME.tmp-XXXXXXXX``) and trash (``.NAME.old-XXXXXXXX``) entries left by a killed save are
  cleaned up by :func:`remove_stale` when a run opens its directory again.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Iterable, Iterator

from .errors import TextokError

# Files whose presence makes a directory textok's own output: a saved model (config.json), a latents directory
# or a checkpoint (meta.json). A training run directory is marked by RUN_MARKER.
MARKERS = ("config.json", "meta.json")
RUN_MARKER = "train_config.json"
STALE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-[0-9a-f]{8}$")


def _suffix() -> str:
    return uuid.uuid4().hex[:8]


def check_replaceable(target: str | Path, markers: tuple[str, ...] = MARKERS, what: str = "output") -> None:
    """Refuse to replace ``target`` unless textok wrote it: a file, or a non-empty directory holding none of
    ``markers``, is the user's and is left alone."""
    target = Path(target)
    if not os.path.lexists(target):
        return
    if not target.is_dir():
        raise TextokError(f"{target} exists and is a file, not a {what} directory; choose another path "
                          "(textok does not replace files it did not write)")
    if target.is_symlink():
        raise TextokError(f"{target} is a symbolic link; give the real directory or another path")
    if any(target.iterdir()) and not any((target / m).is_file() for m in markers):
        raise TextokError(f"{target} already holds files that textok did not write (no {' / '.join(markers)}); "
                          "choose another path, or move those files away yourself")


def remove_stale(directory: str | Path, name: str | None = None) -> list[Path]:
    """Clean up what an interrupted save left in ``directory`` (only for target ``name`` when given, e.g. in a
    folder that is not textok's own); returns what was removed.

    A ``.NAME.tmp-*`` entry is an unfinished write and is deleted. A ``.NAME.old-*`` entry is the previous
    version of NAME moved aside just before the new one was renamed in: when NAME exists it is deleted,
    when NAME is missing (the process died between the two renames) it is put back.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    entries = sorted(directory.iterdir(), key=lambda p: p.name)
    for kind in ("old", "tmp"):  # restore trash before deleting temporaries, so NAME's presence is final
        for path in entries:
            m = STALE.match(path.name)
            if m is None or m.group("kind") != kind or not os.path.lexists(path):
                continue
            if name is not None and m.group("name") != name:
                continue
            target = directory / m.group("name")
            if kind == "old" and not os.path.lexists(target):
                path.rename(target)
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (file creations/renames) to disk where the OS allows it."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(root))


@contextlib.contextmanager
def atomic_directory(target: str | Path, markers: tuple[str, ...] = MARKERS) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``target`` atomically, on error it is removed.

    An existing ``target`` is replaced only when textok wrote it (see :func:`check_replaceable`); that is
    checked before anything is written. Replacing is two renames (old -> trash, new -> target); a crash
    between them leaves the new directory complete under its temporary name and the old one in the trash
    (which :func:`remove_stale` puts back), never a partial ``target``.
    """
    target = Path(target)
    check_replaceable(target, markers)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{_suffix()}"
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        check_replaceable(target, markers)  # nothing of the user's appeared there in the meantime
        if target.exists():
            trash = target.parent / f".{target.name}.old-{_suffix()}"
            target.rename(trash)
            tmp.rename(target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``, on error
    it is removed and ``path`` keeps its previous content (a full disk never leaves a truncated file)."""
    path = Path(path)
    if path.is_dir():
        raise TextokError(f"{path} is a directory; give a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{_suffix()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        tmp.replace(path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


Inputs = Iterable[tuple[str, "str | Path | None"]]


def check_output(path: str | Path, inputs: Inputs = (), *, flag: str = "--out", kind: str = "file",
                 markers: tuple[str, ...] = MARKERS, what: str = "textok output", ignore: Iterable[str] = (),
                 outputs: Inputs = ()) -> None:
    """Refuse an output path before any work is done for it, in one line that names ``flag`` and what to do.

    ``kind`` is how the verb writes it: ``"file"`` (one file, written atomically), ``"directory"`` (a directory
    replaced atomically), ``"run"`` (a directory the verb writes into and reuses, e.g. to resume) or ``"folder"``
    (a directory the verb adds its own named outputs to, beside whatever is there). Every kind is
    refused when it is, or lies inside, one of ``inputs`` (``(flag, path)`` pairs; paths that do not exist, such
    as ``scenes``, are skipped), links followed: writing there would replace what the verb reads; likewise when
    it is one of the command's other ``outputs``. A file is
    refused when it is a directory or cannot be written; a directory when it is a file or a folder holding
    files textok did not write (none of ``markers``; ``ignore`` names entries that do not count), and a replaced
    directory also when an input lies inside it.
    """
    path = Path(path)
    real = Path(os.path.realpath(path))
    for name, other in outputs:
        if other is not None and str(other) != "" and Path(os.path.realpath(other)) == real:
            raise TextokError(f"{flag} {path} is {name} {other} too; give the two outputs different paths")
    for name, given in inputs:
        if given is None or str(given) == "" or not os.path.exists(given):
            continue
        source = Path(os.path.realpath(given))
        if real == source or real.is_relative_to(source):
            where = "is" if real == source else "lies inside"
            raise TextokError(f"{flag} {path} {where} {name} {given}, which this command reads: writing there would "
                              f"replace it; choose an {flag} outside the inputs")
        if kind == "directory" and source.is_relative_to(real):
            raise TextokError(f"{flag} {path} holds {name} {given}, which this command reads, and would be replaced "
                              f"by the output; choose an {flag} outside the inputs")
    if kind == "file":
        if path.is_dir():
            raise TextokError(f"{flag} {path} is a directory; give a file name (e.g. {flag} {path / 'NAME'})")
    elif os.path.lexists(path):
        if not path.is_dir():
            raise TextokError(f"{flag} {path} is a file, not a directory; choose another {flag} (textok does not "
                              "replace files it did not write)")
        if path.is_symlink() and kind == "directory":
            raise TextokError(f"{flag} {path} is a symbolic link; give the real directory or another {flag}")
        skip = set(ignore)
        foreign = sorted(p.name for p in path.iterdir() if p.name not in skip and not STALE.match(p.name))
        if kind != "folder" and foreign and not any((path / m).exists() for m in markers):
            raise TextokError(f"{flag} {path} already holds files that are not a {what} (e.g. {foreign[0]}; no "
                              f"{' / '.join(markers)}): choose another {flag} (an empty or new directory), or move "
                              "those files away yourself")
    # where the first file is created: beside a file or a replaced directory (its temporary), inside a run or folder
    parent = path if kind in ("run", "folder") and path.is_dir() else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise TextokError(f"{flag} {path}: {parent} is a file, not a folder; choose another {flag}")
    refused = _creation_refused(parent)
    if refused is not None:
        raise TextokError(f"{flag} {path}: cannot write in {parent} ({refused}); choose another {flag}")


def _creation_refused(directory: Path) -> str | None:
    """Why a file cannot be created in ``directory`` (read-only, permission denied, ...), or ``None``: tried for
    real, since permission bits do not tell (root, read-only mounts, /sys). An unnamed O_TMPFILE leaves nothing
    behind; where the file system lacks it, a temporary name is created and removed at once."""
    try:
        if hasattr(os, "O_TMPFILE"):
            try:
                os.close(os.open(directory, os.O_TMPFILE | os.O_WRONLY, 0o600))
                return None
            except OSError as err:
                if err.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise
        probe = directory / f".textok-probe.tmp-{_suffix()}"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
        return None
    except OSError as err:
        return err.strerror or str(err)


def check_output_file(path: str | Path, flag: str = "--out", inputs: Inputs = (), outputs: Inputs = ()) -> None:
    """:func:`check_output` for a file."""
    check_output(path, inputs, flag=flag, kind="file", outputs=outputs)


def target_of(path: str | Path) -> str:
    """The file or directory a temporary (``.NAME.tmp-*``) or trash (``.NAME.old-*``) entry stands for, so that an
    error names what the user asked for; any other path as it is."""
    m = STALE.match(Path(path).name)
    return str(Path(path).with_name(m.group("name"))) if m else str(path)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_files(directory: str | Path, names: list[str] | None = None) -> dict[str, str]:
    """``{file name: hex sha256}`` of ``names`` in ``directory`` (default: every file in it), sorted by name."""
    directory = Path(directory)
    names = sorted(p.name for p in directory.iterdir() if p.is_file()) if names is None else sorted(names)
    return {name: sha256_file(directory / name) for name in names}


def check_sha256(directory: str | Path, sums: dict[str, str], names: list[str] | None = None,
                 what: str = "", fix: str = "copy it again from an intact source") -> None:
    """Refuse the first of ``names`` (default: every file in ``sums``) whose sha256 differs from the one
    recorded in ``sums`` when it was written, in one line naming it. A name without a recorded sum is not checked."""
    directory = Path(directory)
    for name in (sorted(sums) if names is None else names):
        digest = sums.get(name)
        if digest is not None and (directory / name).is_file() and sha256_file(directory / name) != digest:
            raise TextokError(f"{what or directory / name} is corrupt ({name} does not match the sha256 recorded "
                              f"when it was written: a damaged disk or a partial copy){'; ' + fix if fix else ''}")


def write_sha256sums(directory: str | Path, sums: dict[str, str], name: str = "SHA256SUMS") -> None:
    """``sums`` as ``directory/NAME`` in the ``sha256sum`` format, so ``sha256sum -c NAME`` checks it too."""
    (Path(directory) / name).write_text("".join(f"{digest}  {file}\n" for file, digest in sorted(sums.items())))


def read_sha256sums(directory: str | Path, name: str = "SHA256SUMS") -> dict[str, str] | None:
    """The sums of :func:`write_sha256sums` (``None`` when the file is absent); a garbled file is corrupt."""
    path = Path(directory) / name
    if not path.is_file():
        return None
    sums: dict[str, str] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        lines = ["?"]
    for line in filter(str.strip, lines):
        m = re.fullmatch(r"([0-9a-f]{64}) [ *](\S.*)", line.strip())
        if m is None or "/" in m.group(2):
            raise TextokError(f"{path} is corrupt (a line is not '<sha256>  <file name>'); copy the directory "
                              f"again, or delete {name} to load it unchecked")
        sums[m.group(2)] = m.group(1)
    return sums


def read_json(path: str | Path, what: str = "") -> object:
    """Parse a JSON file textok wrote; a truncated or garbled one is reported as corrupt in one line."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        why = f"{err.msg} at line {err.lineno}" if isinstance(err, json.JSONDecodeError) else "not UTF-8 text"
        raise TextokError(f"{what or path} is corrupt ({why}); write it again or point to another copy") from None


def check_safetensors(path: str | Path, what: str = "") -> None:
    """Refuse a truncated or garbled safetensors file in one line (only its header is read)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), "pt"):
            pass
    except SafetensorError as err:
        why = str(err).split(": ", 1)[-1]
        raise TextokError(f"{what or path} is corrupt ({why}); write it again or point to another copy") from None
