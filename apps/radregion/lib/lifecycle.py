"""The server's processes live and die together.

MONAI Label runs training, scoring and batch runs as child processes (`python -m monailabel.interfaces.utils.app`)
that build the app again. A child that outlived a killed server once published an older model over a newer one.
Each child now asks the kernel to kill it when the server dies (Linux `PR_SET_PDEATHSIG`), then checks that the
server it was started by is still its parent (it may have died before the request). The thread that started the
child waits for it to end, so the signal is not sent early (it follows the parent thread, not the process).
"""

import ctypes
import logging
import os
import signal
import sys

logger = logging.getLogger(__name__)
TASK_MODULE = "monailabel.interfaces.utils.app"
SERVER_PID = "RADREGION_SERVER_PID"
PR_SET_PDEATHSIG = 1


def is_task_process() -> bool:
    """True in the child processes MONAI Label starts for training, scoring and batch runs."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None) == TASK_MODULE


def bind_to_server() -> bool:
    """In the server: note its pid for the children. In a child: die with the server. Returns is_task_process()."""
    if not is_task_process():
        os.environ[SERVER_PID] = str(os.getpid())  # inherited by the task processes
        return False
    server = os.environ.get(SERVER_PID)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            logger.warning(f"prctl(PR_SET_PDEATHSIG) failed (errno {ctypes.get_errno()})")
    if server and os.getppid() != int(server):
        print(f"RadRegion task: the server (pid {server}) is gone; exiting", file=sys.stderr, flush=True)
        os._exit(3)
    return True
