"""The one module that touches libraries' private attributes (server/library_internals.py)
checks, at import, that each library is the version it was written for and that the
attributes are still there; another version stops the start with a line naming the library,
the version found and what to re-check."""

from __future__ import annotations

import importlib.metadata

import pytest

from server.library_internals import (
    WRITTEN_FOR,
    LibraryInternalsMoved,
    check_libraries,
    check_version,
)


def test_the_installed_versions_and_their_private_attributes_pass_the_check() -> None:
    for library, version in WRITTEN_FOR.items():
        assert importlib.metadata.version(library) == version
        check_version(library, version)
    check_libraries()


@pytest.mark.parametrize(
    ("library", "recheck"),
    [
        ("httpx2", "_pool"),
        ("httpcore2", "_requests"),
        ("coredis", "SlotKeepingPool"),
        ("pydantic-settings", "MappingEnvSource"),
    ],
)
def test_another_version_of_a_library_is_refused_naming_it_and_what_to_recheck(
    library: str, recheck: str
) -> None:
    with pytest.raises(LibraryInternalsMoved) as caught:
        check_version(library, "99.0.0")
    message = str(caught.value)
    assert f"{library} 99.0.0 is installed" in message
    assert f"written for {library} {WRITTEN_FOR[library]}" in message
    assert recheck in message and "\n" not in message
