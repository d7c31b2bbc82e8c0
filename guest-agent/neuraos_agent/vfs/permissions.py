"""Who may find what: a search hit is shown only to a caller who could open the file for reading.

Checked at query time against the backing store as it is now (not the owner and mode stored in
the index, which may lag a chmod by one indexing batch): read permission on the file and search
(x) permission on every directory from the mount root down, by the usual owner/group/other rule.
"""

from __future__ import annotations

import os
import stat as stat_m
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Caller:
    """The asking user: uid, primary gid and supplementary groups."""

    uid: int
    gid: int
    groups: frozenset[int] = frozenset()

    @classmethod
    def current(cls) -> "Caller":
        return cls(os.getuid(), os.getgid(), frozenset(os.getgroups()))

    def allowed(self, st: os.stat_result, want: int) -> bool:
        """`want` is a mask of 4 (read), 2 (write), 1 (execute)."""
        if self.uid == 0:
            return want & 1 == 0 or bool(st.st_mode & 0o111) or stat_m.S_ISDIR(st.st_mode)
        mode = stat_m.S_IMODE(st.st_mode)
        if st.st_uid == self.uid:
            bits = (mode >> 6) & 7
        elif st.st_gid == self.gid or st.st_gid in self.groups:
            bits = (mode >> 3) & 7
        else:
            bits = mode & 7
        return bits & want == want


def may_read(root: Path, rel: str, caller: Caller) -> bool:
    """True when `caller` could read `root/rel` (directories searchable, file readable)."""
    if caller.uid == 0:
        return True
    path = Path(root)
    try:
        parts = Path(rel).parts
        for part in parts[:-1]:
            if not caller.allowed(os.stat(path), 1):
                return False
            path = path / part
        if not caller.allowed(os.stat(path), 1):
            return False
        return caller.allowed(os.lstat(path / parts[-1]), 4)
    except (FileNotFoundError, NotADirectoryError, IndexError):
        return False
