"""Ending the `carpool` process without tearing down what it imported.

With torch and transformers loaded, the interpreter's own shutdown (freeing
every module and object, then the native libraries' destructors) takes about
0.6 s here: longer than `carpool validate`'s own work. When a command has
returned and no other Python thread runs, that teardown changes nothing the
user can see, so `exit_process` does what a normal exit owes (the handlers
registered with `atexit`, which include logging's flush and Ray's disconnect,
then standard output and error) and ends the process at once. Where another
thread is alive, the normal exit waits for it as it always did.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn


def exit_process(code: int) -> NoReturn:
    """End the process with `code`, skipping the interpreter's teardown when it may."""
    if threading.active_count() > 1:
        sys.exit(code)  # the normal exit joins the threads that still run
    try:
        # Private but stable since Python 3.0: the one way to run what `exit` would.
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # a closed pipe, a failing handler: the normal exit reports it
        sys.exit(code)
    os._exit(code)
