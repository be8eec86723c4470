"""Storage failures become one line naming the path, the system's reason and the fix."""

import errno

from selpipe.pipeline.errors import StorageError, storage_error


def test_each_os_error_names_the_path_and_the_fix():
    cases = {errno.ENOSPC: "free some space", errno.EROFS: "read-only", errno.EACCES: "permission denied",
             errno.EEXIST: "already exists"}
    for code, fix in cases.items():
        err = storage_error(OSError(code, "reason", "/runs/r/config.json"), "write the run directory")
        assert isinstance(err, StorageError) and "\n" not in str(err)
        assert str(err).startswith("/runs/r/config.json: cannot write the run directory (reason): ") and fix in str(err)


def test_torchs_zip_writer_failures_are_storage_errors_and_other_runtime_errors_are_not():
    full = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 15872 vs 15766")
    assert "checkpoint write failed" in str(storage_error(full, "write the run directory"))
    assert storage_error(RuntimeError("CUDA out of memory"), "write the run directory") is None
