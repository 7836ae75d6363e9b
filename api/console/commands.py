"""`kling operators`: the people who sign in to the console (not tenants)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console

operators_app = typer.Typer(
    help="Operators of the console at /console (not tenants).", no_args_is_help=True
)
console = Console(stderr=True)


def _sessions(database_url: str | None = None) -> Any:
    from config import Settings
    from workers.db import make_engine, make_session_factory

    url = database_url or Settings().database_url
    return make_session_factory(make_engine(url, pool_size=1))


def create_operator(name: str, database_url: str | None = None) -> str:
    """Create an operator; answers its token, which is stored only as a hash."""
    from workers import operators
    from workers.db import unit_of_work

    with unit_of_work(_sessions(database_url)) as session:
        _, token = operators.create(session, name)
    return token


@operators_app.command("create")
def operators_create(
    name: Annotated[str, typer.Argument(help="a-z, 0-9, '.', '_' and '-'")],
) -> None:
    """Create an operator; prints its console token, this once."""
    from workers.operators import OperatorError

    try:
        token = create_operator(name)
    except OperatorError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from exc
    typer.echo(json.dumps({"operator": name, "token": token}, indent=2))


@operators_app.command("disable")
def operators_disable(name: Annotated[str, typer.Argument(help="The operator's name")]) -> None:
    """Disable an operator: its token no longer signs in, and its sessions end now."""
    from workers import operators
    from workers.db import unit_of_work
    from workers.pipeline import utcnow

    with unit_of_work(_sessions()) as session:
        if not operators.disable(session, name, utcnow()):
            console.print("no live operator with this name")
            raise typer.Exit(1)
    console.print("disabled")


def announce(api_url: str, database_url: str) -> None:
    """Print where the console is and a token to sign in with (a new demo operator)."""
    import secrets

    token = create_operator(f"demo-{secrets.token_hex(3)}", database_url)
    # soft_wrap: a token broken across lines would not paste back whole.
    console.print(
        f"console: [bold]{api_url.rstrip('/')}/console[/]  operator token: {token}", soft_wrap=True
    )
