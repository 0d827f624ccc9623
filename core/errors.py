"""One exception type for mistakes a user can fix, so every command can print one actionable line."""


class UserError(Exception):
    """Bad input (path, config, data or shape): the message names the problem and is shown as one line."""


def main_guard(main):
    """Run a command's `main`, turning a `UserError` into `error: ...` on stderr and exit status 2."""
    import functools
    import sys

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapped
