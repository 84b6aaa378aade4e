"""``m3net lidc phantom``: build the LIDC-phantom training cache (semi-synthetic) in parallel."""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from m3netcore.atomic import write_text_atomic
from m3netcore.crops import Preprocessing, default_preprocessing
from m3netcore.data.cache import CacheWriter, pyramid_specs
from m3netcore.data.lidc import Nodule, load_nodules
from m3netcore.data.manifest import lidc_rows, rows_to_csv
from m3netcore.data.phantom import nodule_appearance, render_nodule_cubes
from m3netcore.errors import M3NetInputError
from m3netcore.progress import track

DESCRIPTION = (
    "LIDC-phantom (SEMI-SYNTHETIC): every LIDC-IDRI nodule's consensus mask drawn at its scan's spacing into "
    "generated lung; intensities from the readers' texture, internal-structure, calcification and margin "
    "ratings; labels from the readers' real malignancy ratings. Not CT of patients."
)
PREVIEW_COUNT = 12

_WORK: dict = {}  # each worker process's nodules and settings (set by _start_worker)


def build_phantom_cache(
    out: str | os.PathLike,
    *,
    seed: int = 0,
    database: str | os.PathLike | None = None,
    limit: int | None = None,
    workers: int | None = None,
    preprocessing: Preprocessing | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Render every nodule (or the first ``limit``) and write the cache to ``out``; returns its path."""
    started = time.perf_counter()
    if Path(out).exists():
        raise M3NetInputError(f"{out} already exists; remove it or choose another --out")
    if seed < 0:
        raise M3NetInputError(f"--seed must be a non-negative integer, got {seed}")
    preprocessing = preprocessing or default_preprocessing()
    rows = lidc_rows(database)  # labels and folds over the whole database, as everywhere else
    if limit is not None:
        rows = rows[:limit]
    # The masks: only the scans needed, grouped exactly as the table was.
    by_id = {n.nodule_id: n for n in load_nodules(database, scan_ids={row["scan_id"] for row in rows})}
    nodules = [by_id[row["nodule_id"]] for row in rows]
    log(f"{len(nodules)} nodules from the LIDC annotations ({time.perf_counter() - started:.0f} s)")
    specs = pyramid_specs(preprocessing)
    workers = workers or max(1, min(os.cpu_count() or 1, 8))
    with CacheWriter(
        out,
        len(nodules),
        kind="lidc-phantom",
        semi_synthetic=True,
        description=DESCRIPTION,
        preprocessing=preprocessing,
        extra={"seed": seed},
    ) as writer:
        # "spawn", not "fork": forking a process whose torch/ITK thread pools hold locks can deadlock.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            max_workers=workers,
            mp_context=context,
            initializer=_start_worker,
            initargs=(nodules, specs, preprocessing, seed),
        ) as pool:
            try:
                rendered = pool.map(_render, range(len(nodules)), chunksize=8)
                for index, cubes, centre in track(rendered, "LIDC-phantom nodules", total=len(nodules),
                                                  unit="nodules"):  # fmt: skip
                    row = rows[index] | _appearance_columns(nodules[index])
                    writer.add_cubes(index, cubes, centre, row)
                log(f"rendered {len(nodules)} nodules ({time.perf_counter() - started:.0f} s)")
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)  # do not render the rest first
                raise
        _save_preview(writer, nodules, rows)
        path = writer.commit()
    log(f"wrote {path} in {time.perf_counter() - started:.0f} s")
    return path


def _start_worker(nodules, specs, preprocessing, seed) -> None:
    import torch

    torch.set_num_threads(1)  # one process per core already
    _WORK.update(nodules=nodules, specs=specs, preprocessing=preprocessing, seed=seed)


def _render(index: int) -> tuple[int, dict[str, np.ndarray], tuple[float, float, float]]:
    cubes, centre = render_nodule_cubes(
        _WORK["nodules"][index], _WORK["specs"], _WORK["preprocessing"], _WORK["seed"]
    )
    return index, {k: np.clip(np.round(v), -32768, 32767).astype(np.int16) for k, v in cubes.items()}, centre


def _appearance_columns(nodule: Nodule) -> dict:
    look = nodule_appearance(nodule)
    return {
        "phantom_density_hu": round(look["density_hu"], 1),
        "phantom_internal_structure": look["internal_structure"],
        "phantom_calcification": look["calcification"],
        "phantom_edge_mm": round(look["edge_mm"], 3),
    }


def preview_indices(count: int) -> list[int]:
    """The nodules shown in ``preview.png`` (and listed in ``preview.csv``): a fixed random draw."""
    rng = np.random.default_rng(0)
    return sorted(int(i) for i in rng.choice(count, size=min(PREVIEW_COUNT, count), replace=False))


def _save_preview(writer: CacheWriter, nodules: Sequence[Nodule], rows: Sequence[dict]) -> None:
    """``preview.png`` in the cache: a few nodules' micro views; ``preview.csv``: their ratings."""
    chosen = preview_indices(len(nodules))
    listed = [
        {"nodule_id": rows[i]["nodule_id"], "diameter_mm": rows[i]["diameter_mm"]}
        | {f"{name}_ratings": "/".join(map(str, nodules[i].ratings[name]))
           for name in ("texture", "margin", "calcification", "internalStructure", "malignancy")}
        for i in chosen
    ]  # fmt: skip
    write_text_atomic(writer.work / "preview.csv", rows_to_csv(listed))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    slices, titles = [], []
    for index in chosen:
        cube = np.asarray(writer.pyramids["micro"][index], dtype=np.float32)
        slices.append(cube[cube.shape[0] // 2])
        ratings = nodules[index].ratings
        titles.append(
            f"{rows[index]['nodule_id']}\n"
            f"malignancy {'/'.join(map(str, ratings['malignancy']))}\n"
            f"texture {'/'.join(map(str, ratings['texture']))} margin {'/'.join(map(str, ratings['margin']))}\n"
            f"calc. {'/'.join(map(str, ratings['calcification']))} d {rows[index]['diameter_mm']:.0f} mm"
        )
    figure = preview_figure(slices, titles)
    figure.savefig(writer.work / "preview.png", dpi=100, bbox_inches="tight", pad_inches=0.08)
    plt.close(figure)


def preview_figure(slices: Sequence[np.ndarray], titles: Sequence[str]):
    """Micro-view slices (HU) with their readers' ratings as titles, four to a row, readable at 100 dpi."""
    import matplotlib.pyplot as plt

    columns = 4
    lines = max(1, (len(slices) + columns - 1) // columns)
    figure, axes = plt.subplots(lines, columns, figsize=(3.2 * columns, 3.9 * lines), squeeze=False,
                                layout="constrained")  # fmt: skip
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, title in zip(axes.ravel(), slices, titles, strict=False):
        ax.imshow(image, cmap="gray", vmin=-1000, vmax=400)
        ax.set_title(title, fontsize=9)  # about 12 px high at 100 dpi
    figure.suptitle("LIDC-phantom (semi-synthetic): micro views (36 mm) of real LIDC outlines in generated lung",
                    fontsize=12)  # fmt: skip
    return figure
