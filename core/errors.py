"""One exception type for mistakes a user can fix, so every command can print one actionable line."""


class UserError(Exception):
    """Bad input (path, config, data or shape): the message names the problem and is shown as one line."""


def main_guard(main):
    """Run a command's `main`, turning a `UserError` into `error: ...` on stderr and exit status 2, and Ctrl-C into
    one line that says how to go on and exit status 130 (128 + SIGINT, as shells report it)."""
    import functools
    import sys

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        argv = args[0] if args else kwargs.get("argv")
        global invoked_command
        previous = invoked_command
        if argv is not None:  # called as a function (a script, a test): record the command it stands for
            invoked_command = ["python", "-m", main.__module__, *map(str, argv)]
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:  # Ctrl-C: the stage contract left no published output half-written
            print("\ninterrupted: nothing unfinished was published; rerun the same command to go on (finished "
                  "stages are kept, a training stage resumes from its last checkpoint)", file=sys.stderr)
            raise SystemExit(130) from None
        finally:
            invoked_command = previous

    return wrapped


invoked_command: list[str] | None = None
"""The command a `main(argv)` call stands for, while it runs (manifests and model cards record it); None when the
process's own command line is the command."""
