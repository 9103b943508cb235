"""``shoal fl ...``: federated learning from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from shoal.cli.common import CONTEXT_SETTINGS, config_errors, err_console, fail

fl_app = typer.Typer(help="Federated learning: certificates, tokens, a gRPC server and clients, and simulation.",
                     no_args_is_help=True, context_settings=CONTEXT_SETTINGS)


def _load(config: Path, set_: list[str], **fields):
    from shoal.fl.config import load_fl_config

    with config_errors():
        return load_fl_config(config, set_, **fields)


@fl_app.command("simulate")
def simulate_command(
    config: Path = typer.Argument(..., help="YAML federated config (examples/fl_mnist1d.yaml)"),
    clients: Optional[int] = typer.Option(None, "--clients", help="clients in the federation (fl.clients)"),
    rounds: Optional[int] = typer.Option(None, "--rounds", help="rounds to run (fl.rounds)"),
    set_: list[str] = typer.Option([], "--set", "-s", help="override a config key: --set fl.strategy=fedprox:mu=0.1"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="output directory (default: the config's 'out')"),
    processes: Optional[int] = typer.Option(
        None, "--processes", min=1, help="worker processes that train each round's clients in parallel, "
        "longest first (fl.processes; default: the usable cores, at most fl.clients_per_round; 1: all in this "
        "process). Results are the same for any count; fl.local_privacy always trains in this process"),
) -> None:
    """Run every client of a federation on this machine, in parallel over worker processes; writes metrics.jsonl,
    summary.json, curves.png to OUT."""
    from shoal.fl.simulate import ClientFailed, simulate

    overrides = [*set_]
    if clients is not None:
        overrides.append(f"fl.clients={clients}")
    if rounds is not None:
        overrides.append(f"fl.rounds={rounds}")
    if processes is not None:
        overrides.append(f"fl.processes={processes}")
    cfg = _load(config, overrides, out=str(out) if out else None)
    try:
        summary = simulate(cfg)
    except ClientFailed as err:
        fail(str(err), "client failed")
    except ValueError as err:  # e.g. more clients than samples
        fail(str(err))
    print_fl_summary(summary)


def print_fl_summary(summary: dict) -> None:
    from shoal.fl.report import summary_table

    Console().print(summary_table(summary))


@fl_app.command("certs")
def certs_command(
    out: Path = typer.Option(..., "--out", "-o", help="directory for the CA (ca.pem, ca.key) and a folder each "
                             "for the server (server/) and every client (NAME/), holding its key, certificate and "
                             "ca.pem"),
    host: list[str] = typer.Option(["localhost", "127.0.0.1"], "--host", help="a name or address clients dial "
                                   "the server by (repeatable)"),
    client: list[str] = typer.Option(["client"], "--client", help="a client certificate to make (repeatable)"),
    force: bool = typer.Option(False, help="replace an existing CA (every certificate it signed stops working)"),
) -> None:
    """Make a federation's CA, the server's certificate and client certificates (mutual TLS).

    Hand each client only its own folder, OUT/NAME; ca.key stays with whoever issues certificates.
    """
    from shoal.fl.certs import make_certs

    try:
        files = make_certs(out, hosts=host, clients=client, force=force)
    except ValueError as err:
        fail(str(err), "certs")
    folders = sorted({p.split("/")[0] for p in files if "/" in p})
    Console().print(f"wrote {len(files)} files to {out}: ca.pem, ca.key (keep it off the clients) and the folders "
                    + ", ".join(f"{f}/" for f in folders), highlight=False)


@fl_app.command("keys")
def keys_command(
    config: Path = typer.Argument(..., help="YAML federated config with fl.secure=ckks"),
    out: Path = typer.Option(..., "--out", "-o", help="directory for ckks-secret.key (for every client) and "
                             "ckks-public.key (for the server)"),
    set_: list[str] = typer.Option([], "--set", "-s", help="override a config key (repeatable)"),
    force: bool = typer.Option(False, help="replace existing keys (every party must then get the new ones)"),
) -> None:
    """Make the CKKS key pair for fl.secure=ckks over gRPC, sized for the config's clients_per_round.

    Hand ckks-secret.key to every client (shoal fl client --he-key) and only ckks-public.key to the server
    (shoal fl server --he-key): the server adds the clients' ciphertexts and cannot decrypt them.
    """
    from shoal.fl.secure.ckks_keys import make_keys

    cfg = _load(config, set_)
    if cfg.fl.secure is None or not cfg.fl.secure.target.needs_keys:
        fail(f"fl.secure: keys are for fl.secure=ckks; this config has "
             f"{cfg.fl.secure.name if cfg.fl.secure else 'no fl.secure'}", "keys")
    mechanism = cfg.fl.secure.target(cfg.fl.secure.options)
    params = mechanism.params(cfg.fl.clients_per_round)
    try:
        secret, public = make_keys(params, out, force=force)
    except ValueError as err:
        fail(str(err), "keys")
    print(f"wrote {secret} (every client's; keep it off the server) and {public} (the server's): CKKS "
          f"N={params.poly_modulus_degree}, primes {list(params.coeff_mod_bit_sizes)}, {params.values_per_slot} "
          f"values a slot, rounds of up to {params.max_clients} clients")


token_app = typer.Typer(help="Enrolment tokens: a client must present one to join, and may speak only for the "
                        "partitions its token holds (stored hashed).",
                        no_args_is_help=True, context_settings=CONTEXT_SETTINGS)
fl_app.add_typer(token_app, name="token")


def _store(db: Optional[str], config: Optional[Path]):
    from shoal.fl.config import ServerConfig
    from shoal.fl.store import ServerStore

    if db is None:
        db = _load(config, []).server.db if config else ServerConfig().db
    return ServerStore(db)


_DB = typer.Option(None, "--db", help="state database: file or SQLAlchemy URL (default: the config's server.db)")
_CONFIG = typer.Option(None, "--config", help="take server.db from this federated config")


@token_app.command("add")
def token_add(name: str = typer.Argument(..., help="who the token is for: the name on the client's certificate"),
              partition: list[int] = typer.Option(..., "--partition", "-p", help="a partition the client holds "
                                                  "(repeatable); requests for any other are refused"),
              db: Optional[str] = _DB, config: Optional[Path] = _CONFIG,
              replace: bool = typer.Option(False, help="replace this name's token")) -> None:
    """Issue a token for NAME holding the given partitions; it is printed once and only its hash is kept."""
    with _store(db, config) as store:
        try:
            token = store.add_token(name, partition, replace=replace)
        except ValueError as err:
            fail(str(err), "token")
        shared = sorted({p for other, _, held in store.list_tokens() if other != name for p in held} & set(partition))
    if shared:
        err_console.print(f"note: partition(s) {', '.join(map(str, shared))} are held by another token too; "
                          "the first to answer a round owns it", highlight=False)
    print(token)


@token_app.command("list")
def token_list(db: Optional[str] = _DB, config: Optional[Path] = _CONFIG) -> None:
    """Names holding a token, when it was issued, and the partitions it holds."""
    import datetime

    with _store(db, config) as store:
        for name, created, held in store.list_tokens():
            when = datetime.datetime.fromtimestamp(created).isoformat(timespec="seconds")
            print(f"{name}\t{when}\tpartitions {','.join(map(str, held)) or 'none (re-issue with --partition)'}")


@token_app.command("revoke")
def token_revoke(name: str, db: Optional[str] = _DB, config: Optional[Path] = _CONFIG) -> None:
    """Withdraw a name's token: its client is refused from the next call on."""
    with _store(db, config) as store:
        if not store.revoke_token(name):
            fail(f"no token named {name!r}", "token")
    print(f"revoked {name}")


privacy_app = typer.Typer(help="Client-level differential privacy (fl.privacy, DP-FedAvg): plan a run's noise and "
                          "budget before it starts.", no_args_is_help=True, context_settings=CONTEXT_SETTINGS)
fl_app.add_typer(privacy_app, name="privacy")


@privacy_app.command("plan")
def privacy_plan_command(
    config: Path = typer.Argument(..., help="YAML federated config with fl.privacy"),
    set_: list[str] = typer.Option([], "--set", "-s", help="override a config key: --set "
                                   "fl.privacy.target_epsilon=3 (repeatable)"),
    json_: bool = typer.Option(False, "--json", help="print the plan as JSON instead of a table"),
) -> None:
    """Print the noise multiplier a federated run will use (fl.privacy.noise_multiplier, or the one calibrated
    to fl.privacy.target_epsilon over fl.rounds) and the epsilon it spends by round, by PLD and RDP.

    Exits 0 when the run fits fl.privacy.target_epsilon or has no target; 2 when it cannot fit, the config
    has no fl.privacy, or the config is bad.
    """
    import dataclasses
    import json
    import logging

    from shoal.fl.privacy.plan import plan_table, privacy_plan

    # dp-accounting's RDP logs each order it drops (small sigma); the RDP column is a cross-check.
    logging.getLogger("absl").setLevel(logging.ERROR)

    cfg = _load(config, set_)
    with config_errors(ValueError):  # a budget no noise fits, no fl.privacy, a count noise too small
        plan = privacy_plan(cfg)
    if json_:
        print(json.dumps({**dataclasses.asdict(plan), "epsilon": plan.epsilon, "fits": plan.fits}, indent=2))
    else:
        Console().print(plan_table(plan))
    if plan.fits is False:
        fail(f"fl.privacy.target_epsilon: {plan.rounds} rounds would spend epsilon {plan.epsilon:.4g} > "
             f"{plan.target_epsilon:g} at delta {plan.delta:g}")


@fl_app.command("server")
def server_command(
    config: Path = typer.Argument(..., help="YAML federated config"),
    set_: list[str] = typer.Option([], "--set", "-s", help="override a config key (repeatable)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="output directory (default: the config's 'out')"),
    address: Optional[str] = typer.Option(None, help="HOST:PORT to listen on (server.address; port 0: any)"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="log every join, refusal and dropped client"),
    he_key: Optional[Path] = typer.Option(None, "--he-key", help="fl.secure=ckks: the public key from `shoal fl "
                                          "keys` (ckks-public.key); the server is never given the secret one"),
) -> None:
    """Run the federation's server: rounds over gRPC with mutual TLS, state in server.db, resumable."""
    import logging

    from shoal.fl.server import FlServer, ServerGaveUp

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = [*set_] + ([f"server.address={address}"] if address else [])
    cfg = _load(config, overrides, out=str(out) if out else None)
    try:
        server = FlServer(cfg, cfg.out, he_key=he_key)
        summary = server.run()
    except (ValueError, ServerGaveUp) as err:
        fail(str(err), "server")
    print_fl_summary(summary)


@fl_app.command("client")
def client_command(
    config: Path = typer.Argument(..., help="YAML federated config (the server's)"),
    server: str = typer.Option(..., "--server", help="HOST:PORT of the server"),
    token: str = typer.Option(..., "--token", envvar="SHOAL_FL_TOKEN", help="enrolment token (or $SHOAL_FL_TOKEN)"),
    partition: int = typer.Option(..., "--partition", help="which client's share of the data this is"),
    certs: Optional[Path] = typer.Option(None, help="this client's folder from `shoal fl certs` (ca.pem, "
                                         "NAME.pem, NAME.key; default: server.certs/NAME)"),
    name: Optional[str] = typer.Option(None, help="this client's name: its certificate's and its token's "
                                       "(default: the one pair in --certs)"),
    insecure: bool = typer.Option(False, help="no TLS (only against a server run with server.insecure)"),
    retry_for: float = typer.Option(120.0, help="seconds to keep retrying while the server is unreachable"),
    set_: list[str] = typer.Option([], "--set", "-s", help="override a config key (repeatable)"),
    privacy_state: Optional[Path] = typer.Option(
        None, help="fl.local_privacy: this client's privacy ledger, read at the start and written after every "
        "round (atomically), so a restarted client goes on spending the same budget"),
    he_key: Optional[Path] = typer.Option(None, "--he-key", help="fl.secure=ckks: the secret key from `shoal fl "
                                          "keys` (ckks-secret.key), which every client holds"),
) -> None:
    """Join a federation: train on this partition whenever selected, until the server finishes."""
    import logging

    from shoal.fl.client import run_client
    from shoal.fl.transport import RpcFailed

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = _load(config, set_)
    if not insecure and certs is None and name is None:
        fail("pass --certs DIR (this client's folder from `shoal fl certs`, OUT/NAME) or --name NAME "
              f"(its folder under server.certs, {cfg.server.certs}/NAME), or --insecure", "client")
    try:
        tally = run_client(cfg, server=server, token=token, partition=partition,
                           certs=None if insecure else (certs or Path(cfg.server.certs)), name=name,
                           retry_for_s=retry_for, privacy_state=privacy_state, he_key=he_key)
    except ValueError as err:
        fail(str(err), "client")
    except RpcFailed as err:
        fail(f"the server refused or failed: {err.code}: {err.details}", "client", code=1)
    Console().print(f"took part in {tally['rounds']} rounds ({tally['accepted']} accepted, {tally['rejected']} "
                    f"rejected, {tally['skipped']} skipped)", highlight=False)
