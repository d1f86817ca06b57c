"""Files that appear whole or not at all: written beside their place, then renamed into it, so a kill (the
kill-and-resume trials SIGKILL run.py at random moments) leaves the old file or the new one, never half of one."""
import os


def write_atomically(path: str, write):
    """Make `path` by `write(tmp)` (which writes the file `tmp`), then rename it over `path`. The temporary name
    carries the pid, so two processes writing one path never share it; a failed write leaves no stray file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
