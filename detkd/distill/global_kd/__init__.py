"""The global-knowledge method (PGM + RDM) and everything it alone uses: the prototype distiller base
(:mod:`.distiller`), the prototype generation module (:mod:`.pgm`), prototype math and generators
(:mod:`.prototypes`), the prototype pool (:mod:`.pool`), the per-batch terms (:mod:`.terms`) and the
"+prototypes" variants of DeFeat, KD and RKD (:mod:`.variants`)."""
