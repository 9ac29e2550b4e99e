"""Command lines for running a program in the desktop container (Singularity, Apptainer, or none).

The command lines are built from spython's own pieces (``init_command``, the ``--bind`` form of
``generate_bind_list`` and the argument order of ``Client.execute``/``Client.build``), so they are what
spython would run. Nothing here runs a command: the gateway's ``run`` helper or the Slurm job script does.

Never pass a secret through these functions: everything ends up on a command line, which every user of
the node can read in ``/proc``. Passwords go to files (mode 0600) or standard input.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

from spython.main.base.command import init_command
from spython.main.parse.parsers import SingularityParser

from gateway.model.errors import UserError

__all__ = [
    "Runtime",
    "ContainerSpec",
    "DefinitionSummary",
    "exec_argv",
    "build_argv",
    "parse_definition",
    "validate_bind",
]

Runtime = Literal["singularity", "apptainer", "none"]
_RUNTIMES: tuple[str, ...] = ("singularity", "apptainer", "none")
_BIND_OPTIONS = frozenset({"ro", "rw"})
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Environment names that would put a secret on the command line.
_SECRET_NAME_RE = re.compile(r"PASSW|SECRET|TOKEN|PRIVATE_KEY", re.IGNORECASE)


def validate_bind(bind: str) -> str:
    """Check one bind spec ``src[:dst[:opts]]`` and return it unchanged.

    ``src`` and ``dst`` must be absolute paths; ``opts`` is ``ro`` or ``rw``. Commas (which Singularity
    reads as a list separator), newlines and empty parts are refused. Raises ``ValueError``.
    """
    if not isinstance(bind, str) or not bind:
        raise ValueError("bind path: empty bind spec")
    if any(c in bind for c in ",\n\r\0"):
        raise ValueError(f"bind path {bind!r}: must not contain commas, newlines or NUL (give one bind per entry)")
    parts = bind.split(":")
    if len(parts) > 3:
        raise ValueError(f"bind path {bind!r}: expected src[:dst[:opts]], got {len(parts)} ':'-separated parts")
    for label, path in zip(("source", "destination"), parts[:2]):
        if not path.startswith("/"):
            raise ValueError(f"bind path {bind!r}: {label} {path!r} must be an absolute path")
    if len(parts) == 3 and parts[2] not in _BIND_OPTIONS:
        raise ValueError(f"bind path {bind!r}: options must be 'ro' or 'rw', got {parts[2]!r}")
    return bind


@dataclass(frozen=True, slots=True)
class ContainerSpec:
    """How desktops run: in a Singularity or Apptainer image, or directly on the node (``none``)."""

    runtime: Runtime
    image: str | None
    binds: tuple[str, ...] = ()
    extra_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.runtime not in _RUNTIMES:
            raise ValueError(f"container runtime must be one of {', '.join(_RUNTIMES)}, got {self.runtime!r}")
        if self.runtime != "none" and not self.image:
            raise ValueError(f"container runtime {self.runtime} needs an image path")
        if isinstance(self.binds, str) or isinstance(self.extra_args, str):
            raise ValueError("container binds and extra_args must be tuples of strings, not a string")
        for bind in self.binds:
            validate_bind(bind)
        for arg in self.extra_args:
            if not isinstance(arg, str) or "\n" in arg or "\0" in arg:
                raise ValueError(f"container extra argument {arg!r}: must be a string without newlines")


def _command(runtime: str, action: str, flags: Sequence[str] = ()) -> list[str]:
    """spython's ``init_command`` (quiet and debug off, like ``spython.main.Client``), for either runtime.

    spython hard-codes the executable name ``singularity``; Apptainer takes the same arguments.
    """
    cmd: list[str] = init_command(SimpleNamespace(quiet=False, debug=False), action, list(flags))
    if cmd[0] != "singularity":  # pragma: no cover - a future spython may change this
        raise RuntimeError(f"unexpected spython command {cmd!r}")
    cmd[0] = runtime
    return cmd


def _bind_args(binds: Sequence[str]) -> list[str]:
    """The ``--bind`` arguments in spython's ``generate_bind_list`` form.

    spython's own function also checks that the source exists on *this* host and calls ``sys.exit``
    otherwise; the desktops run on cluster nodes, so the paths are only validated here.
    """
    args: list[str] = []
    for bind in binds:
        args += ["--bind", validate_bind(bind)]
    return args


def exec_argv(spec: ContainerSpec, argv: Sequence[str], *, env: Mapping[str, str] | None = None) -> list[str]:
    """The command line that runs ``argv`` in the container described by ``spec``.

    For ``runtime: none`` this is ``argv`` itself (with ``env``, prefixed by ``/usr/bin/env NAME=VALUE``).
    For Singularity/Apptainer it is, like spython's ``Client.execute``::

        singularity exec [--bind SRC:DST ...] [--env NAME=VALUE ...] [EXTRA ...] IMAGE ARGV...

    ``env`` holds plain settings (``DISPLAY``, a keyboard layout), never secrets: names that look like
    one (``*PASSWORD*``, ``*TOKEN*``, ``*SECRET*``) raise ``ValueError``. ``argv`` is kept intact.
    """
    if isinstance(argv, str):
        raise ValueError("argv must be a sequence of arguments, not a string")
    argv = list(argv)
    if not argv or not argv[0]:
        raise ValueError("argv must name a program")
    env_pairs = _env_pairs(env or {})
    if spec.runtime == "none":
        if env_pairs:
            return ["/usr/bin/env", *env_pairs, *argv]
        return argv
    cmd = _command(spec.runtime, "exec")
    cmd += _bind_args(spec.binds)
    for pair in env_pairs:
        cmd += ["--env", pair]
    cmd += list(spec.extra_args)
    if spec.image is None:  # ContainerSpec refuses this already; keeps the type checker informed
        raise ValueError(f"container runtime {spec.runtime} needs an image path")
    return cmd + [spec.image] + argv


def _env_pairs(env: Mapping[str, str]) -> list[str]:
    pairs = []
    for name, value in env.items():
        if not _ENV_NAME_RE.fullmatch(name):
            raise ValueError(f"environment variable name {name!r} is not valid")
        if _SECRET_NAME_RE.search(name):
            raise ValueError(
                f"environment variable {name} looks like a secret: pass secrets in a file or on stdin, "
                "never on a command line"
            )
        if "\n" in value or "\0" in value:
            raise ValueError(f"environment variable {name}: value must not contain newlines or NUL")
        pairs.append(f"{name}={value}")
    return pairs


def build_argv(spec: ContainerSpec, definition: Path, image: Path, *, fakeroot: bool = False,
               force: bool = False) -> list[str]:
    """The command line that builds ``image`` from ``definition``, in the order of spython's ``Client.build``::

        singularity build [--force] [--fakeroot] IMAGE DEFINITION

    Run it with the definition's directory as the working directory: ``%files`` sources are relative.
    """
    if spec.runtime == "none":
        raise ValueError("container runtime 'none' has no image to build")
    cmd = _command(spec.runtime, "build")
    if force:
        cmd.append("--force")
    if fakeroot:
        cmd.append("--fakeroot")
    return cmd + [str(image), str(definition)]


@dataclass(frozen=True, slots=True)
class DefinitionSummary:
    """What a Singularity definition file declares, as read by spython's recipe parser."""

    path: Path
    bootstrap: str  # "docker"
    from_: str  # "debian:12" (spython lower-cases it)
    sections: frozenset[str]  # {"post", "environment", "runscript", "labels", "help", ...}
    install: tuple[str, ...]  # the %post lines
    environ: tuple[str, ...]  # the %environment assignments, without "export"
    runscript: str | None  # the %runscript command (spython joins several lines into a script)
    labels: tuple[str, ...]


_BOOTSTRAP_RE = re.compile(r"^\s*bootstrap\s*:\s*(\S+)", re.IGNORECASE)


def parse_definition(path: Path | str) -> DefinitionSummary:
    """Read a Singularity/Apptainer definition with spython's ``SingularityParser``.

    Raises ``UserError`` with a one-line message if the file cannot be read, is empty, has no
    ``Bootstrap:`` or ``From:`` header, or uses a bootstrap agent spython cannot parse (only ``docker``).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read container definition: {getattr(exc, 'strerror', None) or exc}") from None
    if not text.strip():
        raise UserError(f"{path}: container definition is empty")
    bootstrap = None
    for line in text.splitlines():
        match = _BOOTSTRAP_RE.match(line)
        if match:
            bootstrap = match.group(1).lower()
            break
        if line.strip().startswith("%"):
            break
    if bootstrap is None:
        raise UserError(f"{path}: container definition has no 'Bootstrap:' header")
    try:
        parser = SingularityParser(str(path))
    except NotImplementedError:
        raise UserError(
            f"{path}: 'Bootstrap: {bootstrap}' cannot be checked (spython's parser reads only 'Bootstrap: docker')"
        ) from None
    except SystemExit:  # spython's bot.exit on a file it cannot find
        raise UserError(f"{path}: cannot read container definition") from None
    recipe = parser.recipe[parser.active_layer]
    if not recipe.fromHeader:
        raise UserError(f"{path}: container definition has no 'From:' header")
    sections = frozenset(
        parser._get_section(line.strip())[0]  # spython's own section-name reading
        for line in parser.lines
        if line.strip().startswith("%")
    )
    return DefinitionSummary(
        path=path,
        bootstrap=bootstrap,
        from_=recipe.fromHeader,
        sections=sections,
        install=tuple(recipe.install),
        environ=tuple(recipe.environ),
        runscript=recipe.cmd,
        labels=tuple(recipe.labels),
    )
