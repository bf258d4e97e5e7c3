"""Shared by the `genome` CLI tests of this folder."""
from __future__ import annotations

from scripts import cli


def run_cli(argv, capsys):
    """`genome ARGV` in-process -> (exit status, stdout, stderr)."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse-level errors (bad types) exit from inside parse_args
        rc = e.code
    cap = capsys.readouterr()
    return rc, cap.out, cap.err
