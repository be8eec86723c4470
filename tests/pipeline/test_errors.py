"""Storage failures become one line naming the path, the system's reason and the fix."""

import errno

import pytest

from selpipe.pipeline.errors import CacheError, StorageError, first_line, storage_errors


def test_each_os_error_names_the_path_and_the_fix():
    cases = {errno.ENOSPC: "free some space", errno.EROFS: "read-only", errno.EACCES: "permission denied",
             errno.EEXIST: "already exists"}
    for code, fix in cases.items():
        with pytest.raises(StorageError) as caught, storage_errors("write the run directory"):
            raise OSError(code, "reason", "/runs/r/config.json")
        assert "\n" not in str(caught.value) and fix in str(caught.value)
        assert str(caught.value).startswith("/runs/r/config.json: cannot write the run directory (reason): ")


def test_an_os_error_without_a_file_name_is_named_by_the_path_given():
    with pytest.raises(CacheError, match=r"^cache/: cannot read the input"), storage_errors("read the input", "cache/", CacheError):
        raise OSError(errno.EIO, "I/O error")


def test_torchs_zip_writer_failures_are_storage_errors_and_other_runtime_errors_pass():
    with pytest.raises(StorageError, match="checkpoint write failed"), storage_errors("write the run directory", "run"):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 15872 vs 15766")
    with pytest.raises(RuntimeError, match="out of memory"), storage_errors("write the run directory", "run"):
        raise RuntimeError("CUDA out of memory")


def test_first_line():
    assert first_line(ValueError("one\ntwo")) == "one" and first_line(KeyError()) == "KeyError"
