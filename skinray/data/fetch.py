"""Kaggle download of DermNet, verification and extraction to `DEST/train/<class>/...`.

The entry to the data flow when the archive is DermNet itself (`shubhamgoel27/dermnet`). Credentials
come from where the Kaggle client looks for them (`~/.kaggle/kaggle.json`, `$KAGGLE_CONFIG_DIR`,
`KAGGLE_USERNAME`/`KAGGLE_KEY`, `KAGGLE_API_TOKEN`); skinray never prints or stores them. The
extraction is atomic (a temporary folder renamed into place) and leaves a marker, so a second run
finds a verified archive and does nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from skinray import UserError
from skinray.data.sample import DERMNET_CLASSES
from skinray.storage import read_marker, write_json

DATASET = "shubhamgoel27/dermnet"
EXPECTED_COUNTS = {"train": 15557, "test": 4002}
MARKER = ".skinray-fetch.json"


class FetchError(UserError, RuntimeError):
    """The archive could not be fetched or verified; the message says what to do."""


def fetch(dest: str | Path, dataset: str = DATASET) -> dict:
    """Downloads, verifies and extracts DermNet into `dest` unless a verified copy is there.

    Returns the marker's content: the dataset, per-split image counts and the class names.
    """
    dest = Path(dest)
    if (done := _fetched(dest)) is not None:
        return done
    _refuse_foreign_splits(dest)
    api = _kaggle_api()
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
        try:
            api.dataset_download_files(dataset, path=tmp, unzip=False, quiet=False)
        except Exception as exc:  # the client raises many types; all mean the same to a user
            raise FetchError(
                f"could not download '{dataset}' from Kaggle ({type(exc).__name__}: {_short(exc)}). "
                "Check the network connection and that the account has accepted the dataset's "
                f"terms on kaggle.com/datasets/{dataset}; or download the zip by hand and run "
                "`skinray data fetch --zip FILE --dest DIR`."
            ) from None
        zips = sorted(Path(tmp).glob("*.zip"))
        if not zips:
            raise FetchError(f"Kaggle returned no zip file for '{dataset}'")
        return extract(zips[0], dest, verify_dermnet=dataset == DATASET, dataset=dataset)


def _short(exc: Exception) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else "no detail"


def has_credentials(env: dict | None = None, home: Path | None = None) -> bool:
    """True when any credential source the Kaggle client reads is present (no network needed)."""
    env = os.environ if env is None else env
    if env.get("KAGGLE_USERNAME") and env.get("KAGGLE_KEY") or env.get("KAGGLE_API_TOKEN"):
        return True
    config_dir = Path(env.get("KAGGLE_CONFIG_DIR") or (home or Path.home()) / ".kaggle")
    return (config_dir / "kaggle.json").is_file() or (config_dir / "access_token").is_file()


def _kaggle_api():
    if not has_credentials():
        raise FetchError(
            "no Kaggle credentials found. Create an API token at kaggle.com/settings (API section), "
            "save it as ~/.kaggle/kaggle.json (chmod 600), or export KAGGLE_USERNAME and "
            "KAGGLE_KEY; then run the command again."
        )
    # Importing `kaggle` itself authenticates and may exit the process; the class does not.
    from kaggle.api.kaggle_api_extended import KaggleApi

    api = KaggleApi()
    try:
        api.authenticate()
    except (Exception, SystemExit) as exc:
        raise FetchError(
            f"Kaggle rejected the credentials ({_short(exc)}). Create a new API token at "
            "kaggle.com/settings and replace ~/.kaggle/kaggle.json or KAGGLE_KEY."
        ) from None
    return api


# === Verification and extraction ===


def extract(
    zip_path: str | Path, dest: str | Path, verify_dermnet: bool = True, dataset: str = DATASET
) -> dict:
    """Verifies a DermNet-layout zip and extracts it to `dest/train/<class>/...`, atomically.

    The zip may wrap the splits in a top folder. Checks: the zip's CRCs, `train/` and `test/`
    folders of class folders, no member escaping `dest`, and with `verify_dermnet` DermNet's 23
    class names and its 15,557 + 4,002 images.
    """
    dest = Path(dest)
    if (done := _fetched(dest)) is not None:
        return done
    _refuse_foreign_splits(dest)
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise FetchError(
            f"'{zip_path}' is not a readable zip file ({exc}); delete it and fetch again"
        ) from None
    with archive:
        bad = archive.testzip()
        if bad is not None:
            raise FetchError(f"'{zip_path}' is corrupt (bad CRC in {bad}); delete it and fetch again")
        members = _split_members(archive)
        counts = {split: len(files) for split, files in members.items()}
        classes = sorted({rel.parts[0] for files in members.values() for _, rel in files})
        if verify_dermnet:
            _verify_dermnet(zip_path, counts, classes)
        dest.mkdir(parents=True, exist_ok=True)
        _check_free_space(
            zip_path, dest, sum(info.file_size for files in members.values() for info, _ in files)
        )
        staging = Path(tempfile.mkdtemp(dir=dest, prefix=".extract-"))
        try:
            for split, files in members.items():
                for info, rel in files:
                    target = staging / split / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with archive.open(info) as src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
            for split in members:
                shutil.rmtree(dest / split, ignore_errors=True)  # empty, or left by a run cut short
                (staging / split).rename(dest / split)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    marker = {"dataset": dataset, "counts": counts, "classes": classes}
    write_json(str(dest / MARKER), marker)
    return marker | {"already_present": False}


def _fetched(dest: Path) -> dict | None:
    """The marker of an earlier, verified extraction into `dest` (None: none, or unreadable)."""
    marker = read_marker(str(dest / MARKER))
    return None if marker is None else marker | {"already_present": True}


def _refuse_foreign_splits(dest: Path) -> None:
    """`train/` or `test/` folders with files that no verified extraction of ours wrote are never
    replaced: they may be someone's archive."""
    for split in EXPECTED_COUNTS:
        folder = dest / split
        if folder.is_dir() and any(p.is_file() for p in folder.rglob("*")):
            raise FetchError(
                f"'{folder}' already holds files that skinray did not extract there (no {MARKER} "
                "beside it): give another --dest, or move or delete that folder"
            )


def _check_free_space(zip_path, dest: Path, needed: int) -> None:
    free = shutil.disk_usage(dest).free
    if needed > free:
        raise FetchError(
            f"'{zip_path}' extracts to {needed / 1e9:.2f} GB but {dest} has {free / 1e9:.2f} GB free: "
            "free some space or give another --dest"
        )


def _verify_dermnet(zip_path, counts: dict[str, int], classes: list[str]) -> None:
    unexpected = set(classes) ^ set(DERMNET_CLASSES)
    if unexpected:
        raise FetchError(
            f"'{zip_path}' does not hold DermNet's 23 classes (differs in: "
            f"{', '.join(sorted(unexpected)[:5])}); is it the right dataset?"
        )
    if counts != EXPECTED_COUNTS:
        raise FetchError(
            f"'{zip_path}' holds {counts} images, DermNet has {EXPECTED_COUNTS}: "
            "the download is incomplete; delete it and fetch again"
        )


def _split_members(archive: zipfile.ZipFile) -> dict[str, list[tuple[zipfile.ZipInfo, PurePosixPath]]]:
    """Maps 'train' and 'test' to their files as (member, path below the split folder)."""
    members: dict[str, list] = {"train": [], "test": []}
    for info in archive.infolist():
        if info.is_dir():
            continue
        path = PurePosixPath(info.filename)
        if path.is_absolute() or ".." in path.parts:
            raise FetchError(f"zip member '{info.filename}' would escape the destination; refusing")
        parts = [p for p in path.parts]
        split_at = next((i for i, p in enumerate(parts) if p.lower() in members), None)
        if split_at is None or len(parts) - split_at < 3:
            continue  # not <split>/<class>/<file>: licence files, READMEs, stray files
        members[parts[split_at].lower()].append((info, PurePosixPath(*parts[split_at + 1 :])))
    missing = [split for split, files in members.items() if not files]
    if missing:
        raise FetchError(
            f"zip has no {' or '.join(missing)}/<class>/<image> files: not a DermNet-layout archive"
        )
    return members
