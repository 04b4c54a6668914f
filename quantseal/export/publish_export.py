"""Publishing an export's files — ``model.onnx``, its external data ``model.onnx.data``, the
tokenizer and onnxruntime-genai files — as one unit.

Every file is written into a staging folder first; then:

* **folder mode** (the output's folder is new, or holds nothing but what an export writes there):
  the staging folder sits beside the output folder and replaces it in one step with
  :func:`quantseal.publish.publish_folder` (``renameat2(RENAME_EXCHANGE)``, a symlink flip, or the
  repairable two renames), so after a ``kill -9`` at any moment the folder holds the old complete
  export or the new complete one: a ``model.onnx`` never meets another export's ``model.onnx.data``;
* **files mode** (the folder also holds other things: a checkpoint, other models, a user's files):
  the staging folder sits inside it and each file is renamed into place, the model last, so
  ``model.onnx`` itself is always complete.  A model with external data is refused here when an
  earlier ``model.onnx.data`` is in the way (two renames cannot swap a pair); a new one is
  renamed in before its model.

Staging folders are named as :mod:`quantseal.publish` names them (``.NAME.quantseal-tmp-PID-…``),
so the next run or ``quantseal gc`` removes what a killed export left.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import BadInput
from ..publish import _ORPHAN, _pid_alive, fsync_path, publish_folder, temp_folder

COMPANIONS = frozenset({"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                        "sentence_bert_config.json", "genai_config.json"})


def _dead_orphan(name: str) -> bool:
    m = _ORPHAN.match(name)
    return m is not None and not _pid_alive(int(m["pid"]))


def export_files(output: Path) -> frozenset[str]:
    """The names an export to ``output`` may leave in its folder."""
    return COMPANIONS | {output.name, output.name + ".data"}


def owns_folder(output: Path) -> bool:
    """Whether the export to ``output`` may replace its whole folder: the folder is new, or a
    plain folder (not a link, not the working directory, on its parent's file system) holding
    only files an export to ``output`` writes (and dead writers' staging folders)."""
    folder = output.parent.absolute()
    if folder.is_symlink() or folder == folder.parent:
        return False
    if not folder.exists():
        return True
    try:
        if folder.samefile(Path.cwd()) or os.stat(folder).st_dev != os.stat(folder.parent).st_dev:
            return False
        if not os.access(folder.parent, os.W_OK | os.X_OK):
            return False
        allowed = export_files(output)
        return all((p.name in allowed and p.is_file() and not p.is_symlink()) or _dead_orphan(p.name)
                   for p in folder.iterdir())
    except OSError:
        return False


class ExportStage:
    """The staging folder of one export to ``output`` (a path ``DIR/NAME.onnx``).

    Write files into :attr:`dir`, :meth:`add` each name in the order it should appear, then
    :meth:`publish`; :meth:`discard` (always safe to call) removes what is left."""

    def __init__(self, output: Path):
        self.output = Path(output)
        self.folder = self.output.parent
        self.whole_folder = owns_folder(self.output)
        try:
            self.dir = temp_folder(self.folder if self.whole_folder else self.output)
        except OSError as exc:
            raise BadInput(f"{self.output}: cannot write there ({exc.strerror or exc})") from exc
        self.names: list[str] = []

    def add(self, name: str) -> Path:
        self.names.append(name)
        return self.dir / name

    def check_external(self, external: bool) -> None:
        """Refuse, before anything is moved, a model with external data that files mode cannot
        swap in as a unit."""
        data = self.folder / (self.output.name + ".data")
        if external and not self.whole_folder and (data.exists() or data.is_symlink()):
            others = sorted(p.name for p in self.folder.iterdir() if p.name not in export_files(self.output))
            raise BadInput(f"{self.folder}: holds other entries ({', '.join(others[:3])}) besides an earlier "
                           f"{self.output.name} with external data; a model with external data is published as "
                           "one folder: export into a folder of its own")

    def publish(self) -> list[Path]:
        """Make the staged files visible; returns their final paths (model last)."""
        model = self.output.name
        order = [n for n in self.names if n != model] + [model]
        if self.whole_folder:
            mode = os.stat(self.folder).st_mode & 0o7777 if self.folder.is_dir() else 0o777 & ~_umask()
            os.chmod(self.dir, mode)
            publish_folder(self.dir, self.folder)
            return [self.folder / n for n in order]
        self.check_external(model + ".data" in self.names)
        for name in order:
            dst = self.folder / name
            if dst.is_dir():
                raise BadInput(f"{dst}: is a directory; cannot write there")
            os.replace(self.dir / name, dst)
        stale = self.folder / (model + ".data")
        if model + ".data" not in self.names and stale.is_file():
            stale.unlink()  # the previous export's data: the new model no longer reads it
        fsync_path(self.folder)
        return [self.folder / n for n in order]

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
