"""A recording stand-in for the Hugging Face Hub (no Hub is reachable here): the one seam of
``actlightning.face.publish`` (``Hub``), backed by a local folder laid out as the repository would be,
so that ``load_dataset(folder)`` reads what a real ``load_dataset(REPO_ID)`` would."""

from __future__ import annotations

import fnmatch
import shutil
from pathlib import Path


class FolderHub:
    """``Hub``'s methods over ``FolderHub.root / REPO_ID``; every call is recorded in ``FolderHub.calls``.

    ``fail_after``: the upload that many calls in raises, like a connection cut mid-publish.
    """

    root: Path
    calls: list[tuple] = []
    fail_after: int | None = None

    @classmethod
    def reset(cls, root: Path) -> None:
        cls.root, cls.calls, cls.fail_after = root, [], None

    def _repo(self, repo_id: str) -> Path:
        return self.root / repo_id

    def create_repo(self, repo_id: str, private: bool) -> None:
        self.calls.append(("create_repo", repo_id, private))
        self._repo(repo_id).mkdir(parents=True, exist_ok=True)

    def create_branch(self, repo_id: str, branch: str) -> None:
        self.calls.append(("create_branch", repo_id, branch))

    def read_text(self, repo_id: str, path: str, revision: str | None) -> str | None:
        self.calls.append(("read_text", repo_id, path, revision))
        file = self._repo(repo_id) / path
        return file.read_text() if file.exists() else None

    def file_sizes(self, repo_id: str, folder: str | None, revision: str | None) -> dict[str, int]:
        self.calls.append(("file_sizes", repo_id, folder, revision))
        base = self._repo(repo_id)
        return {str(p.relative_to(base)): p.stat().st_size for p in base.rglob("*") if p.is_file()}

    def upload(self, repo_id: str, folder: Path, names: list[str], path_in_repo: str | None, revision: str | None):
        uploads = sum(1 for call in self.calls if call[0] == "upload")
        if self.fail_after is not None and uploads >= self.fail_after:
            raise ConnectionError("connection reset by peer (stand-in)")
        self.calls.append(("upload", repo_id, sorted(names), path_in_repo, revision))
        target = self._repo(repo_id) / (path_in_repo or "")
        target.mkdir(parents=True, exist_ok=True)
        for path in folder.iterdir():
            if path.is_file() and any(fnmatch.fnmatch(path.name, pattern) for pattern in names):
                shutil.copyfile(path, target / path.name)
