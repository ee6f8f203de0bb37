"""Small shared helpers: atomic writes."""
import os
import stat

import pytest

import utils


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def test_atomic_writes_get_the_permissions_open_would_give(tmp_path, umask):
    with utils.atomic_open(tmp_path / "result.csv") as f:
        f.write("a,b\n")
    utils.atomic_torch_save({"x": 1}, tmp_path / "m.pth")
    assert mode(tmp_path / "result.csv") == mode(tmp_path / "m.pth") == 0o644  # readable by colleagues
    umask(0o027)
    with utils.atomic_open(tmp_path / "group.csv") as f:
        f.write("x")
    assert mode(tmp_path / "group.csv") == 0o640
    os.chmod(tmp_path / "result.csv", 0o600)  # a file the user made private stays private when rewritten
    with utils.atomic_open(tmp_path / "result.csv") as f:
        f.write("c,d\n")
    assert mode(tmp_path / "result.csv") == 0o600 and (tmp_path / "result.csv").read_text() == "c,d\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left
