"""The commands behind ``detkd`` (:mod:`detkd.cli` parses the arguments): one module per command, none
importing another; what several share lives below them (:mod:`detkd.viz`, :mod:`detkd.engine`)."""
