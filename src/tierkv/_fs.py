"""The disk tier's directory and files: owner-only, and never reached through a symlink.

``disk_path`` is resolved once, when a store opens it (a symlinked ``disk_path``, or parent, is the operator's
choice and is followed then); inside it the store creates and opens only its own names, and refuses any that is
a symlink, not a regular file (a directory for the index), or owned by neither this user nor the directory's owner:
an attacker who pre-creates ``blocks.data`` as a link to another file gets a ``ValueError``, not that file
truncated and overwritten. Files are opened with ``O_NOFOLLOW``, so a link swapped in after the check fails too.
Directories are created 0700 and files 0600 whatever the umask; existing files of the store are tightened to that.
"""
from __future__ import annotations

import errno
import os
import stat

__all__ = ["private_directory", "open_private_file", "private_subdirectory", "check_private_file", "tighten"]

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


def _unusable(path: str, why: str) -> ValueError:
    return ValueError(f"expected a writable directory for disk_path, got {path!r}: {why}")


def private_directory(path: str) -> tuple[str, frozenset[int]]:
    """Resolve ``path`` (symlinks followed once, here), create what is missing of it owner-only (0700), and
    return ``(resolved path, uids that may own the store's files)``: this user and the directory's owner.
    Raises ``ValueError`` when it is not a directory, belongs to another user (unless this process is root), or
    every user may write to it (anyone could swap the store's files)."""
    real = os.path.realpath(path)
    missing: list[str] = []
    p = real
    while not os.path.lexists(p):
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    try:
        for d in reversed(missing):
            try:
                os.mkdir(d, 0o700)
            except FileExistsError:
                continue  # made meanwhile by someone else: checked like any existing directory below
            fd = os.open(d, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC)
            try:
                os.fchmod(fd, 0o700)  # the umask may have taken bits the owner needs
            finally:
                os.close(fd)
        fd = os.open(real, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.lexists(real):
            raise _unusable(path, "not a directory") from exc
        raise _unusable(path, exc.strerror or str(exc)) from exc
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    euid = os.geteuid()
    if st.st_uid != euid and euid != 0:
        raise _unusable(path, f"owned by uid {st.st_uid}, expected this user's (uid {euid})")
    if st.st_mode & stat.S_IWOTH:
        raise _unusable(path, f"writable by every user (mode {stat.S_IMODE(st.st_mode):o}), expected a directory "
                              "only its owner can change")
    return real, frozenset((st.st_uid, euid))


def _refuse(path: str, what: str, st: os.stat_result, owners: frozenset[int], want_dir: bool = False) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise ValueError(f"expected {what} to be a {'directory' if want_dir else 'regular file'}, got a symlink "
                         f"({path} -> {os.readlink(path)}); the store does not follow symlinks inside disk_path")
    if want_dir and not stat.S_ISDIR(st.st_mode) or not want_dir and not stat.S_ISREG(st.st_mode):
        kind = "directory" if stat.S_ISDIR(st.st_mode) else "special file" if not stat.S_ISREG(st.st_mode) else "file"
        raise ValueError(f"expected {what} to be a {'directory' if want_dir else 'regular file'}, got a {kind} "
                         f"({path})")
    if st.st_uid not in owners:
        raise ValueError(f"expected {what} owned by this user or the owner of disk_path (uid "
                         f"{' or '.join(map(str, sorted(owners)))}), got uid {st.st_uid} ({path})")


def open_private_file(path: str, flags: int, what: str, owners: frozenset[int] | None = None) -> int:
    """``os.open`` of one of the store's files: created 0600, never through a symlink (``O_NOFOLLOW``), refused
    unless a regular file owned by one of ``owners`` (default: this user or the owner of its directory);
    tightened to 0600."""
    if owners is None:
        owners = frozenset((os.stat(os.path.dirname(path) or ".").st_uid, os.geteuid()))
    try:
        fd = os.open(path, flags | _NOFOLLOW | _CLOEXEC, 0o600)
    except OSError:
        try:
            st = os.lstat(path)
        except OSError:
            st = None
        if st is not None and not stat.S_ISREG(st.st_mode):  # a symlink (ELOOP), a directory (EISDIR), ...
            _refuse(path, what, st, owners)
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid not in owners:
            _refuse(path, what, st, owners)
        if stat.S_IMODE(st.st_mode) != 0o600:
            os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_private_file(path: str, what: str, owners: frozenset[int]) -> None:
    """Refuse ``path`` when it exists and is not a regular file of one of ``owners`` (files a library opens)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    _refuse(path, what, st, owners)


def private_subdirectory(path: str, what: str, owners: frozenset[int]) -> None:
    """Create ``path`` 0700, or refuse it when it is a symlink, not a directory, or another user's."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        _refuse(path, what, os.lstat(path), owners, want_dir=True)
    tighten(path, owners, directory=True)


def tighten(path: str, owners: frozenset[int], directory: bool = False) -> None:
    """Set an existing file (or directory) of the store to 0600 (0700), without following a symlink."""
    flags = os.O_RDONLY | (_DIRECTORY if directory else 0)
    fd = os.open(path, flags | _NOFOLLOW | _CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_uid not in owners:
            _refuse(path, "a file of the store", st, owners, want_dir=directory)
        mode = 0o700 if directory else 0o600
        if stat.S_IMODE(st.st_mode) != mode:
            os.fchmod(fd, mode)
    finally:
        os.close(fd)
