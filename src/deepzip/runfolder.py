"""A run's folder: its lock, what a restart may delete, and the small files a run keeps
there (state, recipe, command) read back with their damage caught.

A run folder holds only what deepzip writes (:data:`RUN_FILES`, :data:`RUN_FOLDERS`)
beside whatever the user keeps there; ``--restart`` deletes the former alone, and only
where ``state.json`` is a run's state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .atomic import LOCK_NAME, atomic_write, folder_lock, open_regular, read_json
from .errors import DeepzipError
from .recipe import Recipe
from .train import barrier, is_main_process

__all__ = ["MAX_JSON", "RUN_FILES", "RUN_FOLDERS", "file_sha256", "is_rows",
           "is_search_record", "run_folder", "run_state", "stages_done", "write_run_files"]

MAX_JSON = 64 << 20  # a run's own JSON files are kilobytes
RUN_FILES = ("state.json", "recipe.yaml", "command.txt", "report.json", "report.md",
             "layers.png", "model.dzip")
RUN_FOLDERS = ("prune", "quantize")  # the stages' own folders, made and named by the run


@contextlib.contextmanager
def run_folder(out: str | Path, *, restart: bool = False,
               log: Callable[[str], None] = print) -> Iterator[Path]:
    """The run folder, locked for as long as this run works in it (a second run on it
    stops at once with one line); ``restart`` first deletes an earlier run's files, only
    those a deepzip run writes and only in a folder whose ``state.json`` is a run's,
    never anything else. A folder this call created is removed again if the run fails
    before finishing a stage (only by the run that holds its lock)."""
    out = Path(out)
    if not is_main_process():  # rank 0 locks and clears; the others wait for it
        barrier()
        yield out
        return
    if restart and out.is_symlink():
        raise DeepzipError(f"--restart: {out} is a symlink; name the run folder itself, "
                           "deepzip never deletes through a link")
    new = not out.exists()
    with folder_lock(out):
        try:
            if restart:
                kept = _clear_run(out)
                if kept:
                    log(f"[restart] kept what no deepzip run wrote in {out}: "
                        + ", ".join(sorted(kept)))
            barrier()
            yield out
        except BaseException:
            if new and not stages_done(out):  # a failed start leaves no folder behind
                shutil.rmtree(out, ignore_errors=True)
            raise


def run_state(out: Path) -> dict[str, Any] | None:
    """``out/state.json`` if it is a deepzip run's state (a recipe and its stages)."""
    try:
        state = read_json(out / "state.json", MAX_JSON, "run state")
    except DeepzipError:
        return None
    if isinstance(state, dict) and isinstance(state.get("recipe"), dict) \
            and isinstance(state.get("stages"), dict):
        return state
    return None


def file_sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open_regular(path, "compressed model") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def is_rows(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(r, dict) for r in v)


def is_search_record(kept: Any) -> bool:
    """Is a kept search result (``prune/search.json``, ``quantize/budget.json``) whole:
    a positive number chosen, its baseline and budget numbers, lists of row dicts?"""
    return (isinstance(kept, dict) and _number(kept.get("chosen")) and kept["chosen"] > 0
            and _number(kept.get("baseline_val_score")) and _number(kept.get("max_loss"))
            and is_rows(kept.get("probes")) and is_rows(kept.get("confirmed", [])))


def stages_done(out: Path) -> bool:
    state = run_state(out)
    return bool(state and state["stages"])


def _clear_run(out: Path) -> list[str]:
    """Delete what an earlier deepzip run wrote in ``out`` (its files and its stages'
    folders, links themselves and not what they point to); returns what was kept."""
    entries = [p for p in out.iterdir() if p.name != LOCK_NAME]
    if entries and run_state(out) is None:
        raise DeepzipError(f"--restart: {out} holds no deepzip run state (state.json), so no "
                           "deepzip run made it; not deleting anything in it")
    kept = []
    for p in entries:
        if p.name in RUN_FOLDERS and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.name in RUN_FILES + RUN_FOLDERS and (p.is_symlink() or p.is_file()):
            p.unlink()
        else:
            kept.append(p.name + ("/" if p.is_dir() else ""))
    return kept



def write_run_files(out: Path, recipe: Recipe, made_by: str, note: str = "") -> None:
    """The recipe as run (``recipe.yaml``) and how the run was started (``command.txt``),
    which its report quotes: rank 0 only."""
    if not is_main_process():
        return
    import yaml

    with atomic_write(out / "recipe.yaml", "w") as f:
        f.write(f"# recipe {recipe.name}{note}\n")
        yaml.safe_dump(dataclasses.asdict(recipe), f, sort_keys=False)
    with atomic_write(out / "command.txt", "w") as f:
        f.write(made_by + "\n")
