"""The ensemble bundle on disk: a versioned, verified folder that every scorer loads.

    BUNDLE/
      bundle.json                    the manifest (below)
      members/NN-NAME/model.keras    each member model (preprocessing inside)
      members/NN-NAME/config.yaml    the member's resolved training config
      members/NN-NAME/ood.npz        its class means and precision for out-of-distribution refusal

`bundle.json` holds the classes, each member's file, backbone, input size, temperature and weight,
the abstention threshold and the coverage it was chosen for, the validation metrics, the creation
time, the SHA-256 of every other file (`files`), and the bundle's `version`: the SHA-256 of the
manifest itself without `version`. Since the manifest lists every file's digest, the version
changes when anything in the bundle does. Loading recomputes both and refuses a bundle with a
changed, missing or unexpected file, or an edited manifest. Models load with Keras' safe mode.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

from skinray import UserError
from skinray.console import say

MANIFEST = "bundle.json"
FORMAT = 1
MEMBER_FILES = ("ood_statistics",)  # optional files of a member, beside its model and config


class BundleError(UserError, ValueError):
    """A bundle that is incomplete, altered or of an unknown format."""


def file_digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file below `folder` except the manifest, keyed by POSIX relative path."""
    digests = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if relative != MANIFEST:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            digests[relative] = digest.hexdigest()
    return digests


def read_verified(folder: Path, manifest: dict, name: str) -> bytes:
    """The bytes of one of a verified bundle's files, checked again as they are read: what is loaded is
    exactly what matches the manifest, even if the file changed after `verify` (no check-then-reopen gap)."""
    data = (folder / name).read_bytes()
    if hashlib.sha256(data).hexdigest() != manifest["files"].get(name):
        raise BundleError(
            f"bundle at '{folder}': {name} changed after the bundle was verified; refusing to load it"
        )
    return data


def check_version(manifest: dict, expected: str, source: str) -> None:
    """Refuses a bundle of another version than `expected` (the whole version, or its first 12 or more
    characters, as the console prints it); an empty `expected` accepts any."""
    if not expected:
        return
    if len(expected) < 12:
        raise UserError(f"an expected bundle version needs at least 12 characters (got {expected!r})")
    if not manifest["version"].startswith(expected.lower()):
        raise BundleError(
            f"'{source}' is bundle version {manifest['version'][:16]}, not the expected "
            f"{expected[:16]}: refusing it (another bundle was written there, or the wrong path)"
        )


def manifest_version(manifest: dict) -> str:
    """The SHA-256 of the canonical JSON of the manifest without its `version`."""
    body = {k: v for k, v in manifest.items() if k != "version"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal(folder: Path, manifest: dict) -> dict:
    """Adds the file digests and the version to `manifest` and writes it as the folder's bundle.json."""
    manifest = {**manifest, "format": FORMAT, "files": file_digests(folder)}
    manifest["version"] = manifest_version(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def verify(folder: Path) -> dict:
    """Reads and checks a bundle's manifest against its files; returns the manifest."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"bundle at '{folder}' has no readable {MANIFEST}: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise BundleError(
            f"bundle format {manifest.get('format')!r} is not one this skinray reads ({FORMAT})"
        )
    expected, found = manifest.get("files", {}), file_digests(folder)
    problems = [f"missing file {name}" for name in sorted(expected.keys() - found.keys())]
    problems += [f"unexpected file {name}" for name in sorted(found.keys() - expected.keys())]
    problems += [
        f"changed file {name}"
        for name in sorted(expected.keys() & found.keys())
        if expected[name] != found[name]
    ]
    if not problems and manifest_version(manifest) != manifest.get("version"):
        problems.append(f"{MANIFEST} was edited after the bundle was sealed")
    # A version is a hash, not a signature: anyone can reseal an edited manifest. What it may never
    # do is point a member outside the files it lists (and so outside the bundle).
    problems += [
        f"member {entry.get('name')!r}: {what} {entry.get(what)!r} is not one of the bundle's files"
        for entry in manifest.get("members", [])
        for what in ("file", "config", *MEMBER_FILES)
        if (what in entry or what in ("file", "config")) and entry.get(what) not in expected
    ]
    if problems:
        raise BundleError(
            f"bundle at '{folder}' fails verification, refusing to load it: " + "; ".join(problems)
        )
    return manifest


def refuse_promotion(out: str, promotion: dict) -> dict:
    """Marks the bundle at `out` as not promoted (`promotion`: why), resealing its manifest (a new
    version, which `skinray serve` refuses unless `serve.allow_unpromoted`). Returns the manifest."""
    from skinray.storage import join_uri, read_text, write_text

    manifest = json.loads(read_text(join_uri(out, MANIFEST)))
    if manifest.get("promotion", {}).get("promoted") is False:
        return manifest  # a rerun of the same gate
    manifest = {k: v for k, v in manifest.items() if k != "version"}
    manifest["promotion"] = {"promoted": False, **promotion}
    manifest["version"] = manifest_version(manifest)
    write_text(join_uri(out, MANIFEST), json.dumps(manifest, indent=2))
    return manifest


def check_promoted(manifest: dict, source: str, allowed: bool) -> None:
    """Refuses a bundle the pipeline did not promote, unless `allowed` (serve.allow_unpromoted)."""
    promotion = manifest.get("promotion", {})
    if promotion.get("promoted") is False and not allowed:
        raise BundleError(
            f"'{source}' was not promoted: {promotion.get('why', 'its evaluation failed a gate')}; "
            "serve it anyway with --set serve.allow_unpromoted=true"
        )


def built_before(out: str, sources: list[str], archive: str) -> dict | None:
    """The manifest of the bundle at `out` when the same members on the same archive made it (a
    resubmitted job), None when nothing is there, or only what a write cut short leaves (its
    members' files, no manifest: removed, to be written anew). Anything else is refused: a version
    is never silently replaced, and files that are not a bundle's are never deleted."""
    from skinray.storage import clear_dir, is_empty, join_uri, list_files, read_marker, redact

    if is_empty(out):
        return None
    manifest = read_marker(join_uri(out, MANIFEST))  # written last and whole: unreadable = never finished
    shown = redact(join_uri(out, "")[:-1])
    if manifest is None and all(path.startswith("members/") for path in list_files(out)[3]):
        say(f"{shown} holds a bundle whose writing was cut short (no {MANIFEST}): writing it anew")
        clear_dir(out)
        return None
    if (
        manifest
        and [m["source"] for m in manifest["members"]] == [redact(s) for s in sources]
        and manifest["validation"]["archive"] == redact(archive)
    ):
        return manifest
    what = (
        "a bundle of other members or data"
        if manifest
        else f"not a bundle (no {MANIFEST}) and holds other files"
    )
    raise BundleError(
        f"'{shown}' already exists and is {what}: give the new bundle another --out "
        "(bundles are never overwritten)"
    )


def write_bundle(
    out: str,
    members: list[dict],
    model_files: list[Path],
    configs: list,
    manifest: dict,
    member_files: list[dict[str, tuple[str, bytes]]] | None = None,
) -> dict:
    """Writes a bundle to `out` (a folder or any pyarrow.fs URI) and returns its sealed manifest.

    Args:
        members: one manifest entry per member (name, backbone, image_size, temperature, weight, ...);
            `file` and `config` are filled in here.
        model_files: each member's local `model.keras`.
        configs: each member's resolved `Config`.
        manifest: everything else the manifest holds (classes, threshold, metrics, ...).
        member_files: per member, more files ({key: (file name, bytes)}, keys from MEMBER_FILES):
            written beside its model, their paths in its entry under the key.
    """
    import shutil

    from skinray.config import save_config
    from skinray.storage import upload_folder

    with tempfile.TemporaryDirectory(prefix="skinray-bundle-") as tmp:
        folder = Path(tmp)
        entries = []
        for entry, model_file, config in zip(members, model_files, configs):
            member_dir = folder / "members" / entry["name"]
            member_dir.mkdir(parents=True)
            shutil.copyfile(model_file, member_dir / "model.keras")
            save_config(config, member_dir)
            extra = {}
            for key, (name, data) in (member_files[len(entries)] if member_files else {}).items():
                (member_dir / name).write_bytes(data)
                extra[key] = f"members/{entry['name']}/{name}"
            entries.append(
                {
                    **entry,
                    "file": f"members/{entry['name']}/model.keras",
                    "config": f"members/{entry['name']}/config.yaml",
                    **extra,
                }
            )
        sealed = seal(folder, {**manifest, "members": entries})
        # The manifest last: a write cut short leaves no bundle.json, so nothing loads it as a bundle.
        upload_folder(folder, out, last=(MANIFEST,))
    return sealed
