"""The gadgets modelport names: known globals whose call reads, writes, runs or imports
something, and what each does. A name here only labels an exploit so a report can say what it
would do; what is safe is decided by the allowlists in ``pickles.policy``, never by this table.

A core table because the pickle rules, the Keras config reader and the scanner's content
checks all name gadgets, and a scan of a file that holds no pickle should not import the
pickle machine to do so.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Final

# Known gadgets: (module, name) or (module, "*") -> what calling it does.
_SHELL = "runs a shell command"
_CODE = "executes arbitrary Python code"
_LOADER = "loads another pickle, which can run code (a nested loader)"
_IMPORT = "imports arbitrary modules"
_ATTR = "reaches arbitrary attributes, the first step of most gadget chains"
_FILES = "reads, writes or deletes files"
_NET = "opens network connections"

DENYLIST: Final[MappingProxyType[tuple[str, str], str]] = MappingProxyType(
    {
        **{
            (m, "*"): _SHELL
            for m in ("os", "posix", "nt", "subprocess", "pty", "commands", "popen2")
        },
        ("platform", "popen"): _SHELL,
        ("asyncio.subprocess", "*"): _SHELL,
        ("builtins", "eval"): _CODE,
        ("builtins", "exec"): _CODE,
        ("builtins", "compile"): _CODE,
        ("builtins", "__import__"): _IMPORT,
        ("builtins", "getattr"): _ATTR,
        ("builtins", "setattr"): _ATTR,
        ("builtins", "delattr"): _ATTR,
        ("builtins", "globals"): _ATTR,
        ("builtins", "locals"): _ATTR,
        ("builtins", "vars"): _ATTR,
        ("builtins", "open"): _FILES,
        ("builtins", "breakpoint"): _CODE,
        ("builtins", "input"): "waits for terminal input",
        ("builtins", "memoryview"): "raw memory access",
        ("code", "*"): _CODE,
        ("codeop", "*"): _CODE,
        ("runpy", "*"): _CODE,
        ("timeit", "*"): _CODE,
        ("cProfile", "*"): _CODE,
        ("profile", "*"): _CODE,
        ("pdb", "*"): _CODE,
        ("bdb", "*"): _CODE,
        ("trace", "*"): _CODE,
        ("doctest", "*"): _CODE,
        ("types", "FunctionType"): _CODE,
        ("types", "CodeType"): _CODE,
        ("ctypes", "*"): "calls native code",
        ("marshal", "*"): _CODE,
        ("importlib", "*"): _IMPORT,
        ("importlib", "import_module"): _IMPORT,
        ("pkgutil", "*"): _IMPORT,
        ("sys", "*"): _ATTR,
        ("operator", "attrgetter"): _ATTR,
        ("operator", "methodcaller"): _ATTR,
        ("operator", "getitem"): _ATTR,
        ("functools", "partial"): "binds arguments for a later call (gadget chains)",
        ("functools", "reduce"): "calls a function repeatedly (gadget chains)",
        ("pickle", "*"): _LOADER,
        ("_pickle", "*"): _LOADER,
        ("cloudpickle", "*"): _LOADER,
        ("dill", "*"): _LOADER,
        ("shelve", "*"): _LOADER,
        ("joblib", "load"): _LOADER,
        ("numpy", "load"): _LOADER,
        ("numpy.lib.npyio", "load"): _LOADER,
        ("torch", "load"): _LOADER,
        ("torch.serialization", "load"): _LOADER,
        ("torch.storage", "_load_from_bytes"): _LOADER,
        ("torch.jit", "load"): _LOADER,
        ("torch", "load_config"): _LOADER,  # torch._dynamo.config, torch._inductor.config
        **{
            ("torch.utils.data.datapipes.datapipe", f"_{kind}SerializationWrapper"): _LOADER
            for kind in ("DataPipe", "IterDataPipe", "MapDataPipe")
        },
        ("torch.hub", "load"): "downloads and runs a repository's code",
        ("torch.hub", "load_state_dict_from_url"): _NET,
        ("shutil", "*"): _FILES,
        ("tempfile", "*"): _FILES,
        ("glob", "*"): _FILES,
        ("io", "open"): _FILES,
        ("socket", "*"): _NET,
        ("ssl", "*"): _NET,
        ("http.client", "*"): _NET,
        ("urllib.request", "*"): _NET,
        ("requests", "*"): _NET,
        ("httpx", "*"): _NET,
        ("webbrowser", "*"): "opens a browser",
        ("smtplib", "*"): _NET,
        ("poplib", "*"): _NET,
        ("imaplib", "*"): _NET,
        ("nntplib", "*"): _NET,
        ("ftplib", "*"): _NET,
        ("telnetlib", "*"): _NET,
        ("signal", "*"): "changes process signal handling",
        ("multiprocessing", "*"): _SHELL,
        ("threading", "*"): "starts threads",
        ("_thread", "*"): "starts threads",
        ("builtins", "exit"): "stops the process",
        ("builtins", "quit"): "stops the process",
        ("builtins", "__build_class__"): _CODE,
        ("builtins", "help"): _IMPORT,
        ("pydoc", "*"): _IMPORT,
        ("zipimport", "*"): _IMPORT,
        ("imp", "*"): _IMPORT,
        ("site", "*"): _IMPORT,
        ("ensurepip", "*"): _SHELL,
        ("venv", "*"): _SHELL,
        ("idlelib", "*"): _CODE,
        ("lib2to3", "*"): _FILES,
        ("distutils", "*"): _SHELL,
        ("setuptools", "*"): _SHELL,
        ("pip", "*"): _SHELL,
        ("logging.config", "*"): "evaluates configuration as code and opens sockets",
        ("logging", "FileHandler"): _FILES,
        ("logging.handlers", "*"): "writes files or opens sockets",
        ("codecs", "open"): _FILES,
        ("_io", "*"): _FILES,
        ("io", "FileIO"): _FILES,
        ("fileinput", "*"): _FILES,
        ("linecache", "*"): _FILES,
        ("zipfile", "*"): _FILES,
        ("tarfile", "*"): _FILES,
        ("gzip", "open"): _FILES,
        ("bz2", "open"): _FILES,
        ("lzma", "open"): _FILES,
        ("sqlite3", "*"): _FILES,
        ("dbm", "*"): _FILES,
        ("mmap", "*"): _FILES,
        ("xmlrpc", "*"): _NET,
        ("socketserver", "*"): _NET,
        ("http.server", "*"): _NET,
        ("asyncio", "*"): _SHELL,
        ("concurrent.futures", "*"): "starts threads or processes",
        ("_posixsubprocess", "*"): _SHELL,
        ("_ctypes", "*"): "calls native code",
        ("uuid", "_popen"): _SHELL,
        ("operator", "call"): _ATTR,
        ("builtins", "type"): "creates classes at load time (gadget chains)",
        ("copyreg", "__newobj_ex__"): "instantiates any class with arguments",
        ("numpy.testing._private.utils", "runstring"): _CODE,
        ("numpy.f2py", "*"): _SHELL,
        ("numpy.distutils", "*"): _SHELL,
        ("torch.utils.cpp_extension", "*"): "compiles and loads native code",
        ("torch.package", "*"): _IMPORT,
        ("torch._inductor.codecache", "*"): "compiles and loads native code",
        ("torch.ops", "load_library"): "loads a native library",
        ("torch.classes", "load_library"): "loads a native library",
        ("torch.utils.data.datapipes.utils.decoder", "*"): _LOADER,
        ("pandas", "read_pickle"): _LOADER,
        ("pandas.io.pickle", "*"): _LOADER,
        ("yaml", "load"): _CODE,
        ("yaml", "unsafe_load"): _CODE,
        ("jinja2", "*"): "renders templates that can run code",
        ("IPython", "*"): _CODE,
        ("huggingface_hub", "*"): _NET,
        ("keras.models", "load_model"): _LOADER,
        ("dill", "loads"): _LOADER,
    }
)


def gadget(module: str, name: str) -> str | None:
    """What a known gadget does, or None. Module-wide entries end in ``*``. An entry names
    its module's submodules too (``importlib`` + ``*`` is ``importlib.util``'s, ``joblib`` +
    ``load`` is ``joblib.numpy_pickle.load``): a package's names are defined in its
    submodules, and a pickle may name them there."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        found = DENYLIST.get((prefix, name)) or DENYLIST.get((prefix, "*"))
        if found is not None:
            return found
    return None
