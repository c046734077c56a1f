"""The ``dwconvert`` command line: one module per subcommand."""
