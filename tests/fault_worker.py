"""ringrl-train that kills itself (SIGKILL) in the middle of saving checkpoint $RINGRL_KILL_AT_STEP.

Orbax writes a checkpoint into a temporary folder and renames it into place when every file is
written; this worker dies at that rename, the last moment of the save, so the test sees what a
kill -9 during a save leaves behind. Used by tests/test_cli_robust.py.
"""

import os
import signal

_STEP = os.environ["RINGRL_KILL_AT_STEP"]
_rename = os.rename


def _rename_or_die(src, dst, *args, **kwargs):
    if os.path.basename(os.fspath(dst)) == _STEP and "tmp" in os.path.basename(os.fspath(src)):
        os.kill(os.getpid(), signal.SIGKILL)
    return _rename(src, dst, *args, **kwargs)


os.rename = _rename_or_die

from ringrl.experiments import train  # noqa: E402

train.run()
