"""The command line: one command table (`kdray.cli.main`), the shared flags defined once
(`kdray.cli.flags`), and one module per command."""
