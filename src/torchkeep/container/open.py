"""Opening a container: a file's header, or a directory's manifest and every shard's header and
member file, validated before anything is allocated from them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from torchkeep.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    TorchkeepError,
)
from torchkeep.format import (
    DCP_METADATA_FILE,
    HF_CONFIG_FILE,
    HF_INDEX_FILES,
    HF_SHARD_NAME,
    HF_WEIGHT_FILES,
    MANIFEST_FILE,
    MANIFEST_KEY,
    MAX_MANIFEST_BYTES,
    PROGRAM_FILE,
    SHARD_NAME,
    SHARD_SAVE_KEY,
    Header,
    Manifest,
    check_against_header,
    manifest_from_json,
    parse_header,
    read_header_length,
)
from torchkeep.storage import DEFAULT_STORAGE, LocalStorage, Source, Storage

OPEN_ATTEMPTS = 5  # of a directory replaced while it is opened


@dataclass
class OpenedFile:
    """A file of a save, open for reading, and its validated header."""

    source: Source
    header: Header


def read_whole(storage: Storage, path: str, check: Callable[[int], None]) -> bytes:
    """Read a whole (small) file after ``check(size)`` accepted its size."""
    source = storage.open(path)
    try:
        check(source.size)
        return source.read(0, source.size)
    finally:
        source.close()


def read_manifest(directory: str, storage: Storage = DEFAULT_STORAGE) -> Manifest:
    """Read and validate the manifest of a directory save (its commit marker).

    Raises:
        IncompleteCheckpointError: there is none: the save never committed, or the directory
            is not a torchkeep save (the message says which, and what the directory holds).
        CorruptCheckpointError, UnsupportedFormatError: it is damaged, or of a newer format.
    """
    manifest_path = f"{directory}/{MANIFEST_FILE}"
    if not storage.exists(manifest_path):
        raise IncompleteCheckpointError(_without_manifest(storage, directory))

    def check(size: int) -> None:
        if size > MAX_MANIFEST_BYTES:
            raise CorruptCheckpointError(
                f"{manifest_path}: {size} bytes, over the {MAX_MANIFEST_BYTES}-byte "
                "limit of a manifest; the file is corrupt"
            )

    raw = read_whole(storage, manifest_path, check)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorruptCheckpointError(f"{manifest_path}: not UTF-8 text") from e
    return manifest_from_json(text, where=manifest_path)


READABLE = (
    "torchkeep reads its own saves (a .safetensors file, or a directory committed by its "
    f"{MANIFEST_FILE}), safetensors and torch.save files, Hugging Face model directories "
    f"({' or '.join(HF_WEIGHT_FILES)}, or shards and their index) and "
    f"torch.distributed.checkpoint directories ({DCP_METADATA_FILE} and .distcp files)"
)


def _without_manifest(storage: Storage, directory: str) -> str:
    """Say what a path without a manifest is: a torchkeep save that never committed (its
    shards are there), another tool's directory, or no checkpoint at all."""
    if not storage.is_dir(directory):
        return f"{directory}: no {MANIFEST_FILE}: not a torchkeep directory save. {READABLE}."
    names = storage.list_dir(directory)
    members = [n for n in names if SHARD_NAME.fullmatch(n) or n == PROGRAM_FILE]
    if members:
        return (
            f"{directory}: no {MANIFEST_FILE} beside the files of a save ({', '.join(members[:3])}"
            f"{', …' if len(members) > 3 else ''}); this save never committed (it was "
            "interrupted). Load the previous checkpoint."
        )
    shards = [n for n in names if HF_SHARD_NAME.fullmatch(n)]
    if set(names) & {*HF_INDEX_FILES, *HF_WEIGHT_FILES}:
        what = (
            "a Hugging Face model directory, not a torchkeep save: read its weights with "
            "tk.load_state_dict, tk.load_weights or tk.load"
        )
    elif DCP_METADATA_FILE in names:
        what = "a torch.distributed.checkpoint directory, not a torchkeep save (read it: tk.load)"
    elif shards:
        what = (
            f"Hugging Face weight shards ({', '.join(shards[:2])}, …) without the index that "
            f"names them ({' or '.join(HF_INDEX_FILES)}): the save that wrote them did not "
            "finish, or the index was removed"
        )
    elif HF_CONFIG_FILE in names:
        what = (
            f"no checkpoint: it holds {HF_CONFIG_FILE}, as a Hugging Face model directory does, "
            f"but no weights ({', '.join(HF_WEIGHT_FILES)} or an index of shards)"
        )
    elif not names:
        what = "an empty directory, not a checkpoint"
    else:
        listed = ", ".join(names[:5]) + (f", … ({len(names)} in all)" if len(names) > 5 else "")
        what = f"not a checkpoint: it holds {listed} and no {MANIFEST_FILE}"
    return f"{directory}: {what}. {READABLE}."


def open_directory(
    storage: Storage, path: str, files: dict[str | None, OpenedFile]
) -> Manifest:
    """Open a directory save as one whole: a save that replaced it while its files were being
    opened (a manifest of one save, a shard of the next) is opened again, so that a reader gets
    the old save or the new one. Once open, the files stay readable whatever happens to the
    directory."""
    for attempt in range(OPEN_ATTEMPTS):
        check_inside(storage, path, f"{path}/{MANIFEST_FILE}")
        manifest = read_manifest(path, storage)
        try:
            _open_directory(storage, path, manifest, files)
            return manifest
        except (CorruptCheckpointError, CheckpointNotFoundError, IncompleteCheckpointError):
            if attempt == OPEN_ATTEMPTS - 1:
                raise
            try:
                replaced = read_manifest(path, storage) != manifest
            except TorchkeepError:
                replaced = True  # gone or half-replaced this instant: look again
            if not replaced:
                raise  # damaged, not replaced
            close_files(files)
    raise AssertionError("unreachable")


def close_files(files: dict[str | None, OpenedFile]) -> None:
    for opened in files.values():
        opened.source.close()
    files.clear()


def open_file(
    storage: Storage, path: str, file: str | None, files: dict[str | None, OpenedFile]
) -> OpenedFile:
    """Open ``file`` of the save at ``path`` (None: ``path`` itself) and validate its header;
    record it in ``files``."""
    where = path if file is None else f"{path}/{file}"
    source = storage.open(where)
    try:
        prefix = source.read(0, min(9, source.size)) if source.size else b""
        length = read_header_length(prefix, file_size=source.size, where=where)
        header = parse_header(source.read(8, length), file_size=source.size, where=where)
    except BaseException:
        source.close()
        raise
    opened = OpenedFile(source, header)
    files[file] = opened
    return opened


def open_single(
    storage: Storage, path: str, files: dict[str | None, OpenedFile]
) -> Manifest | None:
    """Open a one-file save, or a plain safetensors file (it has no manifest: None)."""
    if not storage.exists(path):
        raise CheckpointNotFoundError(f"{path}: no such file or directory")
    opened = open_file(storage, path, None, files)
    text = opened.header.metadata.get(MANIFEST_KEY)
    if text is None:
        if any('"format":"torchkeep"' in v for v in opened.header.metadata.values()):
            raise CorruptCheckpointError(
                f"{path}: the header holds a torchkeep manifest under a damaged key; "
                "the file is corrupt"
            )
        return None  # a plain safetensors file written by another tool: no checksums
    manifest = manifest_from_json(text, where=path)
    check_against_header(manifest, opened.header, file=None, where=path)
    if opened.header.metadata != {"format": "pt", MANIFEST_KEY: text}:
        # torchkeep writes exactly these two entries; anything else is damage.
        raise CorruptCheckpointError(
            f"{path}: the header's metadata entries were altered; the file is corrupt"
        )
    return manifest


def check_inside(storage: Storage, path: str, member: str) -> None:
    """Refuse a member that resolves outside the directory (a link pointing elsewhere):
    torchkeep writes no links, and following one would read a file the save does not own."""
    if not isinstance(storage, LocalStorage):
        return  # object stores have no links
    target = os.path.realpath(member)
    if not target.startswith(os.path.realpath(path) + os.sep):
        raise CorruptCheckpointError(
            f"{member}: a link to {target}, outside the checkpoint directory; refused. "
            "Copy the checkpoint with its files, not links to them"
        )


def _open_directory(
    storage: Storage, path: str, manifest: Manifest, files: dict[str | None, OpenedFile]
) -> None:
    """Open and check every shard and member the manifest names."""
    named = {e.file for e in manifest.tensors.values()}
    save_ids = set()
    for file in sorted(f for f in named if f is not None):
        member = f"{path}/{file}"
        origin = manifest.shared.get(file)
        if not storage.exists(member) or storage.is_dir(member):
            if origin is not None:
                raise IncompleteCheckpointError(
                    f"{member}: missing; this save shares that shard with an earlier save "
                    f"(id {origin}) for the tensors that did not change, and without it the "
                    "save is incomplete. Load another checkpoint"
                )
            raise CorruptCheckpointError(
                f"{member}: named by {MANIFEST_FILE} but missing; the checkpoint directory "
                "was modified or copied in part. Restore it from another copy"
            )
        check_inside(storage, path, member)
        opened = open_file(storage, path, file, files)
        save_id = opened.header.metadata.get(SHARD_SAVE_KEY)
        expected = manifest.origin(file)
        if set(opened.header.metadata) != {SHARD_SAVE_KEY} or (
            expected and save_id != expected
        ):
            raise CorruptCheckpointError(
                f"{member}: its header's metadata {opened.header.metadata!r:.120} does not "
                f"name {'the save it is shared from' if origin else 'this save'} "
                f"({expected or 'a save id'}); the shard was altered or comes from another save"
            )
        if origin is None:
            save_ids.add(save_id)
        check_against_header(
            manifest, opened.header, file=file, where=f"{path}/{file}"
        )
    if len(save_ids) > 1:
        raise CorruptCheckpointError(
            f"{path}: its shards come from {len(save_ids)} different saves; "
            "the directory was modified by hand"
        )
    if None in named:
        raise CorruptCheckpointError(
            f"{path}/{MANIFEST_FILE}: a tensor entry names no shard file"
        )
    for name in manifest.files:
        member = f"{path}/{name}"
        if name in named or not storage.exists(member) or storage.is_dir(member):
            raise CorruptCheckpointError(
                f"{member}: named by {MANIFEST_FILE} but missing; the checkpoint directory "
                "was modified or copied in part. Restore it from another copy"
            )
        check_inside(storage, path, member)
