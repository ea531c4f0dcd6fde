"""Imported by every Python process of a test's torchrun run (its folder is on PYTHONPATH).

In torchrun's workers (RANK set) and only when TLBUILD_TEST_AUDIT names a folder, it logs
there each rank's file writes (fileio.atomic_path, which every tlbuild write goes through) and
training epochs; with TLBUILD_TEST_DIE_AFTER_SAVES=n, the process that saves the n-th
checkpoint dies right after it, as a killed run would.
"""

import os

_AUDIT = os.environ.get("TLBUILD_TEST_AUDIT")
_RANK = os.environ.get("RANK")

if _AUDIT and _RANK is not None:
    import contextlib

    # Patched before anything imports it by name, so every writer gets the logging version.
    import tlbuild.fileio as _fileio

    def _log(kind: str, line: str) -> None:
        with open(os.path.join(_AUDIT, f"{kind}.{_RANK}.log"), "a") as f:
            f.write(line + "\n")

    _atomic_path = _fileio.atomic_path

    @contextlib.contextmanager
    def _audited(path):  # noqa: ANN001, ANN202
        _log("writes", str(path))
        with _atomic_path(path) as tmp:
            yield tmp

    _fileio.atomic_path = _audited

    import tlbuild.train.trainer as _trainer

    _train_epoch = _trainer._train_epoch

    def _logged_epoch(fitting, phase, e, epoch, *args, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        _log("epochs", str(epoch))
        return _train_epoch(fitting, phase, e, epoch, *args, **kw)

    _trainer._train_epoch = _logged_epoch

    _die_after = int(os.environ.get("TLBUILD_TEST_DIE_AFTER_SAVES", "0"))
    if _die_after:
        _save = _trainer.save_checkpoint
        _saves = [0]

        def _save_then_die(*args, **kw):  # noqa: ANN002, ANN003, ANN202
            _save(*args, **kw)
            _saves[0] += 1
            if _saves[0] >= _die_after:
                os._exit(3)

        _trainer.save_checkpoint = _save_then_die
