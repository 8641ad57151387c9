"""A cached layer packed as an OCI layer tar and extracted again is the same layer."""

from __future__ import annotations

import io
import os
from pathlib import Path

from pytest_nsbox.images.archive import pack_layer
from pytest_nsbox.images.extract import extract_layer


def test_a_layer_survives_pack_and_extract(tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    (layer / "etc" / "app").mkdir(parents=True)
    (layer / "etc" / "app" / "conf").write_text("x = 1\n")
    os.chmod(layer / "etc" / "app" / "conf", 0o640)
    os.setxattr(layer / "etc" / "app" / "conf", "user.origin", b"test")
    os.symlink("app/conf", layer / "etc" / "link")
    os.symlink("app", layer / "etc" / "dirlink")  # a symlink to a directory is not descended into
    (layer / "bin").mkdir()
    os.chmod(layer / "bin", 0o711)
    packed = io.BytesIO()
    pack_layer(layer, packed)
    packed.seek(0)
    out = tmp_path / "out"
    out.mkdir()
    extract_layer(packed, out, as_root=os.geteuid() == 0)
    assert (out / "etc" / "app" / "conf").read_text() == "x = 1\n"
    assert oct((out / "etc" / "app" / "conf").stat().st_mode & 0o7777) == oct(0o640)
    assert os.getxattr(out / "etc" / "app" / "conf", "user.origin") == b"test"
    assert os.readlink(out / "etc" / "link") == "app/conf" and os.readlink(out / "etc" / "dirlink") == "app"
    assert oct((out / "bin").stat().st_mode & 0o7777) == oct(0o711)
