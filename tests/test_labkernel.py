"""The netem lab's host side that needs no guest: which host directories the guest sees."""

from pathlib import Path

from ray_scout.net.labkernel import _shares


def test_a_checkout_under_tmp_is_shared_read_only_where_the_guest_mounts_its_tmpfs():
    reports = Path("/tmp/rs-labrep-x")
    assert _shares(Path("/tmp/clone"), [reports]) == [(reports, True), (Path("/tmp/clone"), False)]
    assert _shares(Path("/run/user/0/clone"), []) == [(Path("/run/user/0/clone"), False)]


def test_a_checkout_the_host_root_share_shows_or_a_writable_share_holds_is_not_shared_again():
    assert _shares(Path("/work/main"), [Path("/tmp/out")]) == [(Path("/tmp/out"), True)]
    assert _shares(Path("/tmp/out/clone"), [Path("/tmp/out")]) == [(Path("/tmp/out"), True)]
    assert _shares(Path("/tmpfoo/clone"), []) == []  # a sibling of /tmp, visible through the root
