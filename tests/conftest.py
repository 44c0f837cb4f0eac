"""Every test session keeps `chorus serve`'s admin key file in its own temporary folder (CHORUS_ADMIN_KEY_FILE), so
tests that start a server without a key neither read nor write the user's ~/.local/state/chorus/admin-key."""

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True, scope="session")
def _session_admin_key_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CHORUS_ADMIN_KEY_FILE", str(tmp_path_factory.mktemp("state") / "chorus-admin-key"))
        yield
