import os
import tempfile
from pathlib import Path

import pytest

from dunix.errors import AccessDenied
from dunix.fdmove.openas import open_as


@pytest.mark.skipif(os.geteuid() != 0, reason="changing fs ids needs root")
def test_open_is_checked_as_the_user_and_leaves_the_agent_root() -> None:
    # pytest's tmp_path sits in a 0700 folder that no other user may enter
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        check(Path(d))


def check(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("root only")
    secret.chmod(0o600)
    public = tmp_path / "public"
    public.write_text("anyone")
    public.chmod(0o644)
    tmp_path.chmod(0o755)
    with pytest.raises(AccessDenied):
        open_as(65534, 65534, [], str(secret), os.O_RDONLY)
    fd = open_as(65534, 65534, [], str(public), os.O_RDONLY)
    try:
        assert os.read(fd, 100) == b"anyone"
    finally:
        os.close(fd)
    with pytest.raises(FileNotFoundError):
        open_as(65534, 65534, [], str(tmp_path / "missing"), os.O_RDONLY)
    # the calling thread kept its own ids
    fd = os.open(secret, os.O_RDONLY)
    os.close(fd)
