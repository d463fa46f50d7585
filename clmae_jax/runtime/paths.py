"""Every file a run reads or writes goes through here: local paths and object-store URLs (`gs://`) alike.

etils.epath does the work. Orbax uses it too, and with TensorFlow installed its `gs://` backend is tf.io.gfile,
the client that tf.data, tfds and clu's TensorBoard writer use: a run reaches its bucket through one client (and
tensorstore, orbax's array storage). Local paths keep the guarantees of a POSIX file system: files are written
to a temporary name and renamed, so a crash leaves the old content. On an object store a written object appears
whole or not at all, which gives the same guarantee without the rename; a folder "rename" there is a copy and a
delete per file, so it is never atomic (only checkpoints_corrupt/ uses it).

The one file that never goes to the workdir is the log: each process writes main.log on its own disk
(`host_log_dir`), because native libraries write to it through a file descriptor.
"""
import os
import re
import tempfile

from etils import epath

LOG_ROOT_ENV = "CLMAE_LOG_DIR"  # Where the logs of runs with a remote workdir go (default: TMPDIR/clmae_jax_logs).


def is_remote(path) -> bool:
    """True for an object-store URL such as gs://bucket/run."""
    return "://" in str(path)


def join(*parts) -> str:
    """The parts joined by '/' (a URL stays a URL)."""
    return str(epath.Path(parts[0]).joinpath(*parts[1:]))


def absolute(path) -> str:
    """An absolute local path, or the URL as it is."""
    path = str(path).rstrip("/") or "/"
    return path if is_remote(path) else os.path.abspath(path)


def exists(path) -> bool:
    """True when a file or folder is there."""
    return epath.Path(path).exists()


def isdir(path) -> bool:
    """True for a folder (on an object store: a prefix that holds objects)."""
    return epath.Path(path).is_dir()


def makedirs(path):
    """Creates a local folder and its parents (nothing happens when it exists). On an object store folders are
    implied by the objects in them, so there is nothing to make (and tf.io.gfile.makedirs loops forever on a bucket
    that does not exist)."""
    if not is_remote(path):
        epath.Path(path).mkdir(parents=True, exist_ok=True)


def listdir(path) -> list:
    """The names in a folder, sorted."""
    return sorted(p.name for p in epath.Path(path).iterdir())


def files_under(folder) -> list:
    """Paths of every file under `folder`, relative to it, sorted."""
    root = epath.Path(folder)
    found = []
    for parent, _, names in root.walk():
        base = os.path.relpath(str(parent), str(root)) if str(parent) != str(root) else ""
        found += [os.path.join(base, name) for name in names]
    return sorted(found)


def size(path) -> int:
    """A file's size in bytes."""
    return epath.Path(path).stat().length


def open_file(path, mode: str = "rb"):
    """A file object ("r", "w", "rb", "wb"); written content is complete only once it is closed."""
    return epath.Path(path).open(mode)


def read_bytes(path) -> bytes:
    """A whole file's bytes."""
    return epath.Path(path).read_bytes()


def read_text(path) -> str:
    """A whole text file."""
    return epath.Path(path).read_text()


def write_bytes(path, content: bytes):
    """Writes a file (and the folders above it) so that readers see the old content or the new one, never a part
    (see the module doc)."""
    path = epath.Path(path)
    if is_remote(path):
        path.write_bytes(content)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(content)
    os.replace(temporary, path)


def write_text(path, text: str):
    """write_bytes of UTF-8 text."""
    write_bytes(path, text.encode())


def remove(path):
    """Deletes a file, or a folder with everything in it."""
    path = epath.Path(path)
    if path.is_dir():
        path.rmtree()
    else:
        path.unlink()


def rename(source, target):
    """Moves a file or folder (atomic on a local disk, a copy and delete per file on an object store)."""
    epath.Path(source).rename(target)


def host_log_dir(workdir) -> str:
    """Where this host keeps a run's log: the workdir itself when it is local, else a local folder named after the
    URL under $CLMAE_LOG_DIR (default: the temporary folder's clmae_jax_logs/), e.g. /tmp/clmae_jax_logs/gs/
    bucket/run."""
    if not is_remote(workdir):
        return str(workdir)
    root = os.environ.get(LOG_ROOT_ENV) or os.path.join(tempfile.gettempdir(), "clmae_jax_logs")
    scheme, rest = str(workdir).split("://", 1)
    return os.path.join(root, scheme, *[re.sub(r"[^\w.-]", "_", part) for part in rest.strip("/").split("/")])
