"""Every command ends a user's mistake with one `error:` line (exit 2) and Ctrl-C with one line on how to go on
(exit 130), never a traceback."""

import pytest

from core.errors import UserError, main_guard


def test_a_user_error_is_one_line_and_exit_2_and_ctrl_c_is_one_line_and_exit_130(capsys):
    @main_guard
    def mistaken(argv=None):
        raise UserError("the input model nowhere does not exist")

    @main_guard
    def interrupted(argv=None):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as stopped:
        mistaken([])
    assert stopped.value.code == 2
    assert capsys.readouterr().err == "error: the input model nowhere does not exist\n"
    with pytest.raises(SystemExit) as stopped:
        interrupted([])
    assert stopped.value.code == 130
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted:") and "rerun the same command" in lines[0]
