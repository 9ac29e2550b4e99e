"""Commands that prepare an event and need no running gateway: `tokens`, `container build`,
`systemd install`, `apache-config`."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from gateway.cli.checks import after_event_preflight, check_listen
from gateway.cli.shared import load_inputs, program_exists
from gateway.common.files import atomic_write
from gateway.model.errors import InputError, UserError
from gateway.web.app import reserved_segments
from gateway.model.tokens import format_tokens, generate_tokens, load_tokens

__all__ = ["cmd_tokens_check", "cmd_tokens_generate", "cmd_tokens_sheet", "cmd_container_build",
           "cmd_systemd_install", "cmd_apache_config"]


def cmd_tokens_check(args: argparse.Namespace) -> int:
    tokens = load_tokens(args.file, reserved_routes=reserved_segments())
    for warning in tokens.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{args.file}: {len(tokens.accounts)} accounts, no problems")
    return 0


def cmd_tokens_generate(args: argparse.Namespace) -> int:
    try:
        accounts = generate_tokens(
            args.count, host=args.host, prefix=args.prefix,
            first_websocket_port=args.first_websocket_port, first_vnc_port=args.first_vnc_port,
        )
    except ValueError as exc:
        raise UserError(f"cannot generate: {exc}") from None
    except InputError as exc:
        reasons = "; ".join(p.message for p in exc.problems[:3])
        raise UserError(f"cannot generate with these options: {reasons}") from None
    text = format_tokens(accounts)
    if args.output is None:
        sys.stdout.write(text)
        return 0
    if args.output.exists() and not args.force:
        raise UserError(f"{args.output} exists; use --force to overwrite it")
    atomic_write(args.output, text, mode=0o600)
    print(f"Wrote {len(accounts)} accounts to {args.output} (mode 0600)", file=sys.stderr)
    return 0


def cmd_tokens_sheet(args: argparse.Namespace) -> int:
    from gateway.cli.slips import MAX_PER_PAGE, check_url, make_slips, render_sheet

    url = check_url(args.url)
    if not 1 <= args.per_page <= MAX_PER_PAGE:
        raise UserError(f"--per-page {args.per_page}: use 1 to {MAX_PER_PAGE}")
    tokens, config = load_inputs(args.file, args.config)
    if args.output.exists() and not args.force:
        raise UserError(f"{args.output} exists; use --force to overwrite it")
    data = render_sheet(args.output, make_slips(tokens.accounts, url), title=config.event.title,
                        per_page=args.per_page)
    atomic_write(args.output, data, mode=0o600)
    print(f"Wrote {len(tokens.accounts)} slips to {args.output} (mode 0600). It holds every password: print it, "
          "then delete it.", file=sys.stderr)
    return 0


def cmd_container_build(args: argparse.Namespace) -> int:
    from gateway.model.container import ContainerSpec, build_argv, parse_definition

    summary = parse_definition(args.definition)  # a broken definition fails here, in one line
    if args.output.exists() and not args.force:
        raise UserError(f"{args.output} exists; use --force to rebuild it")
    argv = build_argv(ContainerSpec(runtime=args.runtime, image=str(args.output.resolve())), args.definition.resolve(),
                      args.output.resolve(), fakeroot=args.fakeroot, force=args.force)
    if not program_exists(argv[0]):
        raise UserError(f"{argv[0]} not found: install {args.runtime} to build the image")
    print(f"Building {args.output} from {args.definition} ({summary.bootstrap}:{summary.from_}): {' '.join(argv)}",
          file=sys.stderr)
    # The build takes minutes and prints its own progress: let it talk to the terminal directly.
    return asyncio.run(_run_attached(argv, cwd=args.definition.resolve().parent))


async def _run_attached(argv: list[str], *, cwd: Path) -> int:
    process = await asyncio.create_subprocess_exec(*argv, cwd=cwd)
    status = await process.wait()
    if status != 0:
        raise UserError(f"{argv[0]} build failed with status {status}")
    return 0


def cmd_systemd_install(args: argparse.Namespace) -> int:
    from gateway.cli.systemd_unit import install_service, service_spec

    tokens, config = load_inputs(args.tokens, args.config)  # refuse to install a service that can't start
    check_listen(args.listen, config)
    if args.after_event:
        after_event_preflight(config)
    # The unit depends on the config: what desktops write, which users the service makes (as root,
    # without desktop.users set, it creates the event's users), what an after-event service reads.
    spec = service_spec(tokens, config, tokens_path=args.tokens.resolve(),
                        config_path=args.config.resolve() if args.config else None, listen=args.listen,
                        after_event=args.after_event)
    unit = install_service(spec, args.unit_dir)
    print(f"Wrote {unit}. Start it with: systemctl daemon-reload && systemctl enable --now {unit.name}")
    print(f"State, logs and workspaces: {spec.state_dir}; stop with: systemctl stop {unit.name}")
    return 0


def cmd_apache_config(args: argparse.Namespace) -> int:
    from gateway.proxies.apache import render_apache_config
    from gateway.proxies.websockify import PerAccountWebsockify
    from gateway.proxies.relay import BuiltinRelay

    tokens, config = load_inputs(args.tokens, args.config)
    if config.proxy.mode == "shared":
        # The shared mode's route tokens are secrets made fresh by each `gateway up`.
        raise UserError("proxy.mode shared: use apache.mode system, which installs the rules at each start")
    mode = BuiltinRelay(config, {}) if config.proxy.mode == "builtin" else PerAccountWebsockify(config, Path("."))
    routes = mode.routes(tokens.accounts)
    text = render_apache_config(config, routes, web_port=args.web_port, layout=None, listen=config.listen)
    sys.stdout.write(text)
    return 0
