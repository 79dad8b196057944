"""cli.py: what every script's command line shares, so a user sees one kind of error everywhere.

Every CLI of the project (bpe.py, model.py, optim.py, accounting.py, train.py, sample.py, experiments/run.py)
reports a problem as one line on stderr, `PROG: error: what is wrong and what to do`, never a traceback, and exits
with one of two codes:
  2  bad input: a flag, a file or its contents, something the user can fix (argparse's own code for usage errors);
  1  the environment: a full disk, a failed download, a run that diverged; not the input's fault.
This file sits below bpe.py, the lowest layer of the stack, so every layer can use it without importing the
tokenizer (or anything else: it needs only the standard library).
"""
import argparse

EXIT_BAD_INPUT = 2
EXIT_ENVIRONMENT = 1


class BadInputError(ValueError):
    """A problem with the user's input (flags, data, a checkpoint): the CLI prints its one line and exits with 2.

    A ValueError, so library callers that catch ValueError for bad arguments keep working."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit code 2) naming the problem and --help; argparse's
    default also prints the whole usage block first."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")
