"""A scene saved as a folder that Slicer opens: ``scene.mrml`` with each node's data beside it.

No Qt and no ``slicer.app``: works in the application, in the batch script and on the
``slicer-core`` wheel.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path


def save_scene(scene, folder: str | os.PathLike) -> None:
    """The scene as ``folder/scene.mrml`` with every node's data beside it, replaced whole.

    Written into a temporary folder beside ``folder`` and moved into place, so a failure
    leaves the previous scene folder as it was.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        used: set[str] = set()
        nodes = scene.GetNodesByClass("vtkMRMLStorableNode")
        for index in range(nodes.GetNumberOfItems()):
            node = nodes.GetItemAsObject(index)
            if not node.GetSaveWithScene():
                continue
            if node.IsA("vtkMRMLColorNode") and not node.GetAttribute("M3Net.Role"):
                continue  # Slicer's built-in colour tables come with Slicer
            storage = node.GetStorageNode()
            if storage is None:
                node.AddDefaultStorageNode()
                storage = node.GetStorageNode()
                if storage is None:  # nothing to store (e.g. a procedural node)
                    continue
            stem = re.sub(r"[^A-Za-z0-9._-]+", "_", node.GetName() or node.GetID()).strip("._") or "node"
            while stem in used:
                stem += "_"
            used.add(stem)
            path = staging / f"{stem}.{storage.GetDefaultWriteFileExtension()}"
            storage.SetFileName(str(path))
            if not storage.WriteData(node):
                raise OSError(f"could not write {node.GetName()!r} into the scene folder")
        scene.SetRootDirectory(str(staging))
        scene.SetURL(str(staging / "scene.mrml"))
        if not scene.Commit():
            raise OSError(f"could not write {staging / 'scene.mrml'}")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
        scene.SetRootDirectory(str(folder))
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
