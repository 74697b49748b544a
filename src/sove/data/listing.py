"""Listing the image files of a folder tree: sorted, hidden names skipped, each real file once."""

from __future__ import annotations

import heapq
import os
from pathlib import Path
from typing import Sequence

from sove.errors import warn


def _file_key(entry: os.DirEntry, folder_dev: int) -> tuple[int, int] | str:
    """What identifies the real file behind ``entry``: (st_dev, st_ino), or its path when it
    cannot be stat'ed (a broken link, kept so that decoding it reports the problem)."""
    if not entry.is_symlink():
        return folder_dev, entry.inode()  # from the directory listing itself: no extra system call
    try:
        st = os.stat(entry.path)
    except OSError:
        return entry.path
    return st.st_dev, st.st_ino


def _is_dir(entry: os.DirEntry) -> bool:
    """Whether ``entry`` is (a link to) a folder; a link that cannot be resolved (one that points to
    itself, a loop of links) is not: it is listed as a file if its name has an image extension, so
    that decoding it reports it under ``data.on_error``."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def list_images(root: Path, extensions: Sequence[str]) -> list[Path]:
    """Image files under ``root`` (recursive, symbolic links followed, hidden files and folders
    skipped), sorted by relative path; every real file and folder is listed once.

    Folders are entered in sorted order of their relative paths. A folder reached a second time
    through a symbolic link (a link to a parent makes a cycle) is not entered again, and a file
    seen before under another path (a link or a hard link to it) is not listed again: the first
    path in sorted order is kept. One warning line gives the count of what was left out and an
    example; a folder that cannot be listed (no permission) is left out with a warning too.
    """
    extensions = tuple(e.lower() for e in extensions)
    found: dict[str, tuple[tuple[int, int] | str, Path]] = {}
    seen_dirs: dict[tuple[int, int], Path] = {}
    repeats: dict[str, list[str]] = {"folder": [], "file": []}
    pending = [("", root)]  # heap of (relative path, folder)
    while pending:
        _, folder = heapq.heappop(pending)
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen_dirs:
                repeats["folder"].append(f"folder '{folder}' is '{seen_dirs[st.st_dev, st.st_ino]}'")
                continue
            seen_dirs[st.st_dev, st.st_ino] = folder
            with os.scandir(folder) as listing:
                entries = [e for e in listing if not e.name.startswith(".")]
        except OSError as e:
            warn(f"cannot list folder '{folder}' ({e.strerror}); its images are left out")
            continue
        for entry in entries:
            path = Path(entry.path)
            rel = path.relative_to(root).as_posix()
            if _is_dir(entry):
                heapq.heappush(pending, (rel, path))
            elif entry.name.lower().endswith(extensions):
                found[rel] = (_file_key(entry, st.st_dev), path)
    files, first = [], {}
    for rel in sorted(found):
        key, path = found[rel]
        if key in first:
            repeats["file"].append(f"file '{path}' is '{first[key]}'")
        else:
            first[key] = path
            files.append(path)
    if repeats["folder"] or repeats["file"]:
        counts = " and ".join(f"{len(v)} {k}(s)" for k, v in repeats.items() if v)
        example = (repeats["folder"] or repeats["file"])[0]
        warn(f"'{root}': left out {counts} reached again through symbolic or hard links (e.g. {example}); "
             "each real file and folder is listed once")
    return files
