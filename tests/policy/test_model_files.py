"""Broken policy files, written for real: `policy.rl.load` says in plain words what is wrong with each."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from policy.rl import ModelError, PolicyNetwork, RLPolicy, load, make_meta, save

NUMPY_JARGON = ("pickled", "allow_pickle", "unsafely", "is not a file in the archive", "magic string")


def good(tmp_path: Path) -> Path:
    return save(RLPolicy(PolicyNetwork.zeros(), make_meta(PolicyNetwork.zeros(), "test")), tmp_path / "good.npz")


def npz(path: Path, **arrays: np.ndarray) -> Path:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    path.write_bytes(buffer.getvalue())
    return path


def members(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {name: data[name] for name in data.files}


def broken_files(tmp_path: Path) -> list[tuple[Path, str]]:
    """(a broken file, what load must say about it)."""
    ok = good(tmp_path)
    arrays = members(ok)
    out = []
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"\x80\x04\x95 this is not a zip archive, it looks like a pickle")
    out.append((garbage, "not a policy file: a policy is an .npz (ZIP) archive, this is 53 bytes that are not a complete ZIP"))
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    out.append((empty, "not a policy file: a policy is an .npz (ZIP) archive, this is an empty file"))
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(ok.read_bytes()[: ok.stat().st_size // 2])
    out.append((truncated, "not a complete ZIP archive (truncated, or another kind of file)"))
    flipped = bytearray(ok.read_bytes())
    flipped[60] ^= 0xFF  # inside the first member's compressed data: the CRC or inflate check catches it
    damaged = tmp_path / "damaged.npz"
    damaged.write_bytes(bytes(flipped))
    out.append((damaged, "the policy file is damaged: its "))
    no_meta = npz(tmp_path / "no_meta.npz", theta=arrays["theta"], obs_mean=arrays["obs_mean"], obs_std=arrays["obs_std"])
    out.append((no_meta, "not a ratepilot policy: the archive has no 'meta' (it holds obs_mean, obs_std, theta; a policy holds meta, theta, obs_mean, obs_std)"))
    two_missing = npz(tmp_path / "two.npz", meta=arrays["meta"], theta=arrays["theta"])
    out.append((two_missing, "the archive has no 'obs_mean', 'obs_std'"))
    objects = tmp_path / "objects.npz"
    buffer = io.BytesIO()
    np.savez(buffer, **{**arrays, "theta": np.array([{"evil": 1}], dtype=object)})  # pickled object array
    objects.write_bytes(buffer.getvalue())
    out.append((objects, "the policy file's 'theta' member holds Python objects, not numbers (refused: reading it would mean unpickling)"))
    not_npy = tmp_path / "not_npy.npz"
    with zipfile.ZipFile(not_npy, "w") as archive:
        for name, value in arrays.items():
            archive.writestr(f"{name}.npy", b"plain text" if name == "obs_std" else value.tobytes())
    out.append((not_npy, "member is not a numpy array"))
    strings = npz(tmp_path / "strings.npz", **{**arrays, "theta": np.array(["0.1"] * arrays["theta"].size)})
    out.append((strings, "the policy file's 'theta' array holds <U3 values, not numbers"))
    bad_meta = npz(tmp_path / "bad_meta.npz", **{**arrays, "meta": np.array("{not json")})
    out.append((bad_meta, "corrupt meta record: not JSON (Expecting property name enclosed in double quotes at character 1)"))
    other = npz(tmp_path / "other.npz", **{**arrays, "meta": np.array(json.dumps({"format": "sklearn"}))})
    out.append((other, "not a ratepilot policy file"))
    out.append((tmp_path, "is a folder, not a policy file"))
    out.append((tmp_path / "nothing.npz", "no such policy file"))
    return out


def test_each_broken_file_is_named_in_plain_words(tmp_path: Path) -> None:
    for path, message in broken_files(tmp_path):
        with pytest.raises(ModelError) as caught:
            load(path)
        text = str(caught.value)
        assert text.startswith(f"{path}: ") and message in text, text
        assert not any(jargon in text for jargon in NUMPY_JARGON), text
        assert "\n" not in text


def test_the_good_file_still_loads(tmp_path: Path) -> None:
    assert load(good(tmp_path)).network.hidden == 0
