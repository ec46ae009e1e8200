"""stmdit: a Snakemake pipeline reproducing STMDiT (Vlachas et al., 2026)."""

__version__ = "0.1.0"
