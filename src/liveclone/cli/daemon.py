"""``liveclone daemon``: one long-running service for many clones (``liveclone.daemon``)."""

from __future__ import annotations

import os

import click

from liveclone.cli.options import SIZE, poll_option
from liveclone.daemon import paths
from liveclone.errors import UsageError
from liveclone.nbd import limits as nbd_limits

DEFAULT_MAX_COPIERS = 4


@click.command("daemon")
@click.option("--state-dir", default=None, metavar="DIR",
              help="Where the daemon records its clones, to serve them again after a "
                   "restart (default: /var/lib/liveclone for root, "
                   "$XDG_STATE_HOME/liveclone otherwise).")
@click.option("--api", "api", default=None, metavar="PATH",
              help="The REST API's unix socket, mode 0600 (default: "
                   "/run/liveclone/api.sock for root, $XDG_RUNTIME_DIR/liveclone/api.sock "
                   "otherwise).")
@click.option("--nbd-socket", default=None, metavar="PATH",
              help="The unix socket where every clone is an NBD export named after it, "
                   "mode 0600 (default: api.sock's directory/nbd.sock).")
@click.option("--listen", default=None, metavar="HOST:PORT",
              help="Serve NBD on TCP instead of the unix socket. ':PORT' listens on "
                   "127.0.0.1 only; other machines need an explicit address and should "
                   "use --tls-certificates: NBD has no authentication.")
@click.option("--tls-certificates", "tls_dir", type=click.Path(file_okay=False), default=None,
              help="Require TLS on NBD (clients use nbds://) with DIR/server-cert.pem and "
                   "DIR/server-key.pem.")
@click.option("--mount", "mountpoint", type=click.Path(file_okay=False), default=None,
              help="Also show each clone as the file DIR/<name> (FUSE).")
@click.option("--cache-dir", default=None, metavar="DIR",
              help="Where each remote source is fetched once, for all its clones "
                   "(default: STATE-DIR/cache).")
@click.option("--cache-size", type=SIZE, default=None,
              help="Bound the cache: least-recently-used entries no clone uses are evicted.")
@click.option("--no-cache", is_flag=True, help="Read remote sources directly, each clone "
              "on its own.")
@click.option("--max-copiers", type=click.IntRange(min=1), default=DEFAULT_MAX_COPIERS,
              show_default=True, help="Most clones copying at once; others wait their turn.")
@click.option("--rate", type=SIZE, default=None,
              help="Total bytes per second for all background copies, shared between the "
                   "clones that copy (e.g. 200M). A clone's own rate is kept too.")
@click.option("--max-connections", type=click.IntRange(min=1), default=1024,
              show_default=True, help="Most NBD clients at once, all clones together.")
@click.option("--max-memory", type=SIZE, default=nbd_limits.DEFAULT_MAX_MEMORY,
              show_default="64M", help="Most memory held for NBD clients' requests.")
@poll_option
def command(state_dir: str | None, api: str | None, nbd_socket: str | None,
            listen: str | None, tls_dir: str | None, mountpoint: str | None,
            cache_dir: str | None, cache_size: int | None, no_cache: bool, max_copiers: int,
            rate: int | None, max_connections: int, max_memory: int,
            poll_max_ns: int) -> None:
    """Run the liveclone daemon: many clones in one process, managed over a REST API.

    Create clones with `liveclone add` (or POST /v1/clones on the API socket); each
    is served at once as the NBD export <name> on the daemon's socket, and copied in
    the background. The daemon records its clones in its state directory: after a
    crash or a reboot, it serves every one of them again under the same name and
    resumes its copy. SIGTERM commits every clone's map and exits 0.
    """
    from liveclone.cli.serve import exposure_warning, limits_option, parse_listen, tls_option
    from liveclone.daemon.service import Options, run, setup_logging
    from liveclone.mountpoint import check_mountpoint

    if nbd_socket is not None and listen is not None:
        raise UsageError("give --nbd-socket or --listen, not both")
    if cache_dir is not None and no_cache:
        raise UsageError("give --cache-dir or --no-cache, not both")
    state_dir = os.path.abspath(state_dir or paths.state_dir())
    api = os.path.abspath(api or os.path.join(paths.runtime_dir(), paths.API_NAME))
    tcp = parse_listen(listen) if listen is not None else None
    if tcp is None:
        nbd_socket = os.path.abspath(nbd_socket or os.path.join(os.path.dirname(api),
                                                                paths.NBD_NAME))
    tls = tls_option(tls_dir)
    if mountpoint is not None:
        try:
            check_mountpoint(mountpoint)
        except UsageError as e:
            if "stale" not in e.message:  # a killed daemon's: detached at start
                raise
        mountpoint = os.path.abspath(mountpoint)
    if not no_cache:
        cache_dir = os.path.abspath(cache_dir or os.path.join(state_dir, "cache"))
    limits = limits_option(max_connections, nbd_limits.DEFAULT_HANDSHAKE_LIMIT, max_memory)
    setup_logging()
    if tcp is not None:
        warning = exposure_warning(*tcp, tls=tls is not None)
        if warning:
            click.echo(f"liveclone: {warning}", err=True)
    run(Options(state_dir=state_dir, api=api, nbd_socket=nbd_socket, listen=tcp, tls=tls,
                mount=mountpoint, cache_dir=None if no_cache else cache_dir,
                cache_size=cache_size, max_copiers=max_copiers, rate=rate, limits=limits,
                poll_max_ns=poll_max_ns))
