"""Under ``pytest -n N``: the tests that use the model run on one worker, so the model loads and
the evaluation runs once per session, not once per worker.

xdist's own ``loadgroup`` cannot be used for this with pytest 9 (its workers rename node ids
through an attribute pytest 9 no longer reads), so the grouping is done with xdist's public
scheduler hook: each worker writes, while it collects, the node ids of its tests that use a model
fixture into a folder the controller chose; the controller's scheduler — xdist's load-scope
scheduler with every other test its own scope, i.e. plain ``load`` — puts those in one scope.
Imported only when xdist runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from xdist.scheduler.loadscope import LoadScopeScheduling

GROUP = "layerwise"


def write_worker_ids(folder: str, worker: str, nodeids: list[str]) -> None:
    """A worker's grouped node ids, written atomically before it reports its collection."""
    target = Path(folder) / f"{worker}.json"
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(sorted(nodeids)))
    os.replace(tmp, target)


class ModelGroupScheduling(LoadScopeScheduling):
    """``load`` scheduling, except that the tests using the model form one work unit."""

    def __init__(self, config: Any, log: Any = None, folder: str = "") -> None:
        super().__init__(config, log)
        self.folder = Path(folder)
        self._grouped: set[str] | None = None

    def _group(self) -> set[str]:
        if self._grouped is None:  # every worker wrote its file before it reported its collection
            self._grouped = set()
            for f in self.folder.glob("*.json"):
                self._grouped.update(json.loads(f.read_text()))
        return self._grouped

    def _split_scope(self, nodeid: str) -> str:
        return GROUP if nodeid in self._group() else nodeid
